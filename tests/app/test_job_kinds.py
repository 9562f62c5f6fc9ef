"""The API takes job kinds from the spec union; every kind has a worker handler; the API never imports torch."""

import subprocess
import sys

from crosspatch.app.schemas.jobs import job_kinds


def test_every_kind_of_the_spec_union_has_a_handler_and_no_handler_lacks_a_kind():
    from crosspatch.app.worker.handlers import HANDLERS

    kinds = job_kinds()
    assert len(kinds) >= 6 and "divergence" in kinds and "pipeline" in kinds
    assert kinds == sorted(HANDLERS)


def test_importing_the_api_imports_neither_the_worker_nor_torch():
    code = (
        "import sys, crosspatch.app.main; "
        "print(sorted(m for m in ('torch', 'crosspatch.app.worker', 'crosspatch.app.worker.handlers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

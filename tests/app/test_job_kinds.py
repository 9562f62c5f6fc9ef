"""The API takes job kinds from the spec union; every kind has a worker handler; the API never imports torch."""

import subprocess
import sys

from crosspatch.app.schemas.jobs import job_kinds


def test_every_kind_of_the_spec_union_has_a_handler_and_no_handler_lacks_a_kind():
    from crosspatch.app.worker.handlers import HANDLERS

    kinds = job_kinds()
    assert len(kinds) >= 6 and "divergence" in kinds and "pipeline" in kinds
    assert kinds == sorted(HANDLERS)


def test_importing_the_api_imports_neither_the_handlers_nor_torch():
    """The API process stays light: no torch, no engine, no job handlers (app/main.py only takes the
    supervisor's device lock to start its embedded worker subprocess)."""
    heavy = (
        "torch",
        "crosspatch.engine.crosspatch",
        "crosspatch.app.worker.handlers",
        "crosspatch.app.worker.main",
    )
    code = f"import sys, crosspatch.app.main; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_router_or_service_imports_the_worker():
    """Data flows one way: app/api and app/services never import app/worker (read from the source)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "app"
    offenders = []
    for path in [*(root / "api").glob("*.py"), *(root / "services").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("crosspatch.app.worker")]
    assert offenders == []

import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # `import helpers`
if os.environ.get("PYTEST_XDIST_WORKER"):
    # under `pytest -n N` the N workers share the cores: one torch thread each (and in the worker and
    # server processes the tests start, which inherit this environment)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


LONGEST_FIRST = ("test_chaos.py", "test_end_to_end.py", "test_worker_lifetime.py")  # minutes, not seconds


def pytest_configure(config):
    """Keep the order below under xdist: loadfile would otherwise sort files by test count, which puts the
    one-test chaos file (minutes) last, alone."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """The longest files first (xdist's loadfile hands files out in collection order, see pytest_configure),
    so the chaos test no longer runs alone at the end; `@pytest.mark.gpu` tests run only where CUDA is
    available (skipped, with the reason, elsewhere)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    import pytest

    skip = pytest.mark.skip(reason="needs a CUDA device (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

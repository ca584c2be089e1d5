import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # repo root (model.py, dno.py, ...) and tests/ (tiny.py)


def pytest_configure(config):
    # python -m pytest -q tests                  the whole suite (CI)
    # python -m pytest -q -m "not slow" tests    the fast subset, for quick iteration
    config.addinivalue_line("markers", "slow: tens of seconds or more: end-to-end train.py runs (the full demo, "
                            "kill-and-resume, torchrun), torch.compile, training to convergence")
    # DNO_EXPERIMENTS=1 python -m pytest -q -m experiment tests    the experiments (minutes each)
    config.addinivalue_line("markers", "experiment: a claim measured on a full experiment (5+ CPU-minutes); "
                            "run with DNO_EXPERIMENTS=1, skipped otherwise")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("DNO_EXPERIMENTS") == "1":
        return
    skip = pytest.mark.skip(reason="an experiment (5+ CPU-minutes): set DNO_EXPERIMENTS=1 to run it")
    for item in items:
        if "experiment" in item.keywords:
            item.add_marker(skip)

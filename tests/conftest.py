import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # repo root (model.py, dno.py, ...) and tests/ (tiny.py)


def pytest_configure(config):
    # python -m pytest -q tests                  the whole suite (CI)
    # python -m pytest -q -m "not slow" tests    the fast subset, for quick iteration
    config.addinivalue_line("markers", "slow: tens of seconds or more: end-to-end train.py runs (the full demo, "
                            "kill-and-resume, torchrun), torch.compile, training to convergence")

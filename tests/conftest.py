import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # repo root (model.py, dno.py, ...) and tests/ (tiny.py)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of train.py in subprocesses (tens of seconds)")

"""bench/gpu_check.sh on a machine without a GPU: one line saying so, exit 0, nothing measured."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: run the check itself")
def test_gpu_check_on_cpu_says_it_needs_a_gpu_and_exits_cleanly():
    r = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHON=sys.executable), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "bench/gpu_check.sh: needs a CUDA GPU (none here); nothing measured"
    assert r.stderr == ""
    # the Python side refuses the same way when run alone
    r = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "needs a CUDA GPU" in r.stdout

"""train.py --optimistic N (extension 2, dno.optimistic_reference) end to end on a tiny random
Llama: iteration t's stored reference is the geometric mixture of the last N iterates with halving
weights (the update that is exactly optimistic multiplicative weights: tests/test_tabular.py), and
the flag is refused beside --ref_mix."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(__file__))
import dno  # noqa: E402
from dnolib.model import Transformer  # noqa: E402
from dnolib.stages import read_jsonl  # noqa: E402
from test_train import cmd, env_for, task  # noqa: E402,F401  (the tiny task fixture)


@torch.no_grad()
def logps(path, pairs):
    model = Transformer.from_pretrained(path, device=torch.device("cpu"))
    c, r, _ = dno.pair_logps(model, pairs, torch.device("cpu"))
    return c.double(), r.double()


def test_optimistic_reference_mixes_the_past_iterates(task, tmp_path):
    out = tmp_path / "run"
    argv = cmd(task, out, "--iterations", "3", "--optimistic", "2", "--replay", "0",
               "--target", "soft", "--pairs", "all")
    p = subprocess.run(argv, env=env_for(task), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    pi = {1: str(task / "model"), 2: str(out / "iter_1/checkpoint"), 3: str(out / "iter_2/checkpoint")}
    for t, w in ((1, {1: 1.0}), (2, {2: 0.5, 1: 0.5}), (3, {3: 0.5, 2: 0.5})):   # N = 2 kept
        pairs = read_jsonl(out / f"iter_{t}/reference/pairs.jsonl")
        got = torch.tensor([[q["ref_chosen"], q["ref_rejected"]] for q in pairs], dtype=torch.double)
        want = sum(wk * torch.stack(logps(pi[k], pairs), 1) for k, wk in w.items())
        assert torch.allclose(got, want, atol=1e-4)
        plain = torch.stack(logps(pi[t], pairs), 1)
        assert t == 1 or (got - plain).abs().max() > 1e-3            # not pi_t's own log-probs
    # both extensions: (1 - beta) times the optimistic mixture + beta log pi_1 (was: refused)
    both = tmp_path / "both"
    argv = cmd(task, both, "--iterations", "3", "--optimistic", "2", "--ref_mix", "0.25",
               "--replay", "0", "--target", "soft", "--pairs", "all")
    p = subprocess.run(argv, env=env_for(task), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    pi = {1: str(task / "model"), 2: str(both / "iter_1/checkpoint"),
          3: str(both / "iter_2/checkpoint")}
    pairs = read_jsonl(both / "iter_3/reference/pairs.jsonl")
    got = torch.tensor([[q["ref_chosen"], q["ref_rejected"]] for q in pairs], dtype=torch.double)
    w = {3: 0.75 * 0.5, 2: 0.75 * 0.5, 1: 0.25}
    want = sum(wk * torch.stack(logps(pi[k], pairs), 1) for k, wk in w.items())
    assert torch.allclose(got, want, atol=1e-4)

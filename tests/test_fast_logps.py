"""The training path's fused log-probs (model(idx, select, targets) + train.sequence_batch) against the slow,
obviously-correct one: full (B, T, V) logits -> dno.sequence_logps. Values and gradients must agree."""
import pytest
import torch

import dno
import train
from model import Transformer
from tiny import make_hf_model

torch.set_num_threads(1)


def slow(model, seqs):
    """dno.sequence_logps on full logits: the reference implementation."""
    T = max(len(p) + len(r) for p, r in seqs)
    idx, mask = torch.zeros(len(seqs), T, dtype=torch.long), torch.zeros(len(seqs), T - 1)
    for i, (p, r) in enumerate(seqs):
        idx[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p) - 1:len(p) + len(r) - 1] = 1
    return dno.sequence_logps(model(idx[:, :-1]), idx[:, 1:], mask)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])   # qwen2: lm_head tied to the embedding
def test_fused_response_logps_match_full_logits(arch, tmp_path):
    make_hf_model(arch, tmp_path / arch)
    model = Transformer.from_pretrained(tmp_path / arch)
    g = torch.Generator().manual_seed(0)
    rnd = lambda n: torch.randint(5, model.args.vocab_size, (n,), generator=g).tolist()
    seqs = [(rnd(p), rnd(r)) for p, r in [(5, 9), (3, 1), (12, 4), (1, 7)]]
    want = slow(model, seqs)
    w = torch.tensor([0.3, -1.0, 2.0, 0.5])
    (want * w).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got, ntok = train.sequence_batch(model, seqs, torch.device("cpu"))
    (got * w).sum().backward()
    assert ntok == sum(len(p) + len(r) for p, r in seqs) and got.shape == (4,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert want.abs().min() > 1.0                                       # real sums of log-probs, not zeros
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-5, msg=n)
    with torch.no_grad():                                               # select alone: the selected rows' logits
        idx = torch.tensor([seqs[0][0] + seqs[0][1]])
        sel = torch.zeros_like(idx, dtype=torch.bool)
        sel[0, 2:6] = True
        torch.testing.assert_close(model(idx, select=sel), model(idx)[sel])

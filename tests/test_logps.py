"""Tests for logps.py: the slow reference (sequence_logps) token by token, and the training
path's fused log-probs (dno.batch_logps: model(idx, select, targets)) against it: full (B, T, V)
logits -> dno.sequence_logps. Values and gradients must agree; under bf16 autocast they agree to
bf16's precision."""
import pytest
import torch

import dno
from dnolib.model import Transformer
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


def setup(arch, tmp_path):
    make_hf_model(arch, tmp_path / arch)
    model = Transformer.from_pretrained(tmp_path / arch)
    g = torch.Generator().manual_seed(0)
    rnd = lambda n: torch.randint(5, model.args.vocab_size, (n,), generator=g).tolist()
    return model, [(rnd(p), rnd(r)) for p, r in [(5, 9), (3, 1), (12, 4), (1, 7)]]


def grads(model, fn, w):
    model.zero_grad()
    logp = fn()
    (logp * w).sum().backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


W = torch.tensor([0.3, -1.0, 2.0, 0.5])   # an arbitrary weighting of the 4 sequences: d(sum w*logp)/d params


@pytest.mark.parametrize("arch", ["llama", "qwen2"])   # qwen2: lm_head tied to the embedding
def test_fused_response_logps_match_full_logits(arch, tmp_path):
    model, seqs = setup(arch, tmp_path)
    want, ref = grads(model, lambda: slow(model, seqs), W)
    got, gg = grads(model, lambda: dno.batch_logps(model, seqs, torch.device("cpu"))[0], W)
    assert dno.batch_logps(model, seqs, "cpu")[1] == sum(len(p) + len(r) for p, r in seqs) and got.shape == (4,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert want.abs().min() > 1.0                                       # real sums of log-probs, not zeros
    for n in ref:
        torch.testing.assert_close(gg[n], ref[n], rtol=1e-4, atol=1e-5, msg=n)
    with torch.no_grad():                                               # select alone: the selected rows' logits
        idx = torch.tensor([seqs[0][0] + seqs[0][1]])
        sel = torch.zeros_like(idx, dtype=torch.bool)
        sel[0, 2:6] = True
        torch.testing.assert_close(model(idx, select=sel), model(idx)[sel])
    for bad in ([], [([], [5, 6])]):                                    # nothing to score / no prompt token
        with pytest.raises(ValueError):
            dno.batch_logps(model, bad, "cpu")


def cpu_bf16_autocast_works():
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    except (RuntimeError, TypeError):
        return False


@pytest.mark.skipif(not cpu_bf16_autocast_works(), reason="CPU bf16 autocast unavailable in this torch build")
def test_bf16_autocast_matches_fp32(tmp_path):
    """bf16 keeps 8 significand bits: relative spacing 2^-8 = 0.4%, about 3 significant digits. The trunk's
    matmuls run in bf16 and the log-softmax in float32 (model.HeadLogp), so each token log-prob (~ -log 102 =
    -4.6 at random init) carries a rounding error of a fraction of 0.4%, partly cancelling over a sequence.
    Bound: relative error of each per-sequence sum < 5e-3, about one bf16 ulp (this 2-core CPU measured 3e-4;
    2e-2 would hide a log-softmax done in bf16). The gradient must point the same way: cosine > 0.99 between
    the flattened bf16 and fp32 gradients (measured > 0.9999)."""
    model, seqs = setup("llama", tmp_path)
    f32, g32 = grads(model, lambda: dno.batch_logps(model, seqs, "cpu")[0], W)
    b16, g16 = grads(model, lambda: dno.batch_logps(model, seqs, "cpu", autocast_dtype=torch.bfloat16)[0], W)
    assert b16.dtype == torch.float32 and not torch.equal(b16, f32)      # autocast really ran in bf16
    rel = ((b16 - f32).abs() / f32.abs()).max().item()
    assert rel < 5e-3, rel
    flat = lambda g: torch.cat([v.flatten().float() for v in g.values()])
    cos = torch.nn.functional.cosine_similarity(flat(g16), flat(g32), dim=0).item()
    assert cos > 0.99, cos


# ----------------------------------------------------------------------------- the slow reference

class TinyLM(torch.nn.Module):                                   # causal by construction (a GRU)
    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(vocab, d), torch.nn.Linear(d, vocab)
        self.rnn = torch.nn.GRU(d, d, batch_first=True)

    def forward(self, idx):
        return self.head(self.rnn(self.emb(idx))[0])             # (B, T, V)


def test_logps_match_token_by_token_and_ignore_prompt_and_padding():
    torch.manual_seed(0)
    model = TinyLM()
    seqs = [([1, 5, 3], [4, 4, 2]), ([1, 7], [9, 3, 6, 8, 2]), ([1, 2, 3, 4], [5])]   # (prompt, response)
    T = max(len(p) + len(r) for p, r in seqs)
    idx = torch.zeros(len(seqs), T, dtype=torch.long)            # right padding with id 0
    mask = torch.zeros(len(seqs), T)
    for i, (p, r) in enumerate(seqs):
        idx[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p):len(p) + len(r)] = 1
    with torch.no_grad():
        got = dno.sequence_logps(model(idx)[:, :-1], idx[:, 1:], mask[:, 1:])
        for i, (p, r) in enumerate(seqs):                         # slow path: one token at a time, no padding
            want, prefix = 0.0, list(p)
            for tok in r:
                logits = model(torch.tensor([prefix]))[0, -1]
                want += torch.log_softmax(logits.double(), -1)[tok].item()
                prefix.append(tok)
            assert got[i].item() == pytest.approx(want, abs=1e-5)
    assert got.dtype == torch.float32 and got.shape == (3,)


def test_logps_masked_positions_do_not_count():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 13, generator=g)
    targets = torch.randint(0, 13, (2, 6), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]])
    base = dno.sequence_logps(logits, targets, mask)
    want = sum(torch.log_softmax(logits[0, t], -1)[targets[0, t]] for t in (2, 3, 4))
    assert base[0].item() == pytest.approx(want.item(), abs=1e-5)
    off = mask == 0
    logits2 = torch.where(off[..., None], torch.randn(2, 6, 13, generator=g) * 100, logits)
    targets2 = torch.where(off, torch.full_like(targets, -100), targets)  # ignore-index ids are fine
    assert torch.equal(dno.sequence_logps(logits2, targets2, mask), base)
    half = dno.sequence_logps(logits.bfloat16(), targets, mask)    # bf16 logits: float32 sum
    assert half.dtype == torch.float32 and torch.allclose(half, base, atol=0.1)
    with pytest.raises(ValueError):
        dno.sequence_logps(logits, targets[:, :-1], mask)

"""Sequence log-probs log pi(y | x), the inputs of DNO's loss: the slow reference on full logits
and the fused training path, tested against each other.

    python logps.py                    # demo: a tiny random Llama, fused == full-logits log-probs
    python -m pytest -q tests/test_logps.py

    from logps import batch_logps, pair_logps, sequence_logps
    logp, n_tokens = batch_logps(model, [(prompt_ids, response_ids), ...], device)   # (B,)
    logp_pos, logp_neg, n_tokens = pair_logps(model, pairs, device)    # stored pairs -> (m,), (m,)
    logp = sequence_logps(logits, targets, mask)     # (B, T, V), (B, T), (B, T) -> (B,)

log pi(y | x) = sum over the response tokens y_t of log pi(y_t | x, y_<t): the quantity in every
ratio pi / pi_t of dno.py's loss (dno_loss), for the policy pi and the reference pi_t alike
(iteration.py computes the reference's once, optimize.py the policy's at each step).

Departures from the paper: none. Sequence log-probs are sums over response tokens, as in the
paper (never means); the prompt and the padding do not count.
"""
from contextlib import nullcontext

import torch


def sequence_logps(logits, targets, mask):
    """log pi(y | x) = sum_t log pi(y_t | x, y_<t) over positions where mask == 1 (the response).

    The slow, obviously-correct reference (and batch_logps' test oracle): full (B, T, V) logits.
    logits (B, T, V) already aligned with targets (B, T): logits[:, t] predicts targets[:, t]
    (callers pass model(idx)[:, :-1] and idx[:, 1:]). mask (B, T) is 0 on prompt and padding.
    Returns (B,) float32. Only the target's log-prob is formed: logit - logsumexp, no (B, T, V)
    log-softmax is kept.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2] or mask.shape != targets.shape:
        raise ValueError(f"sequence_logps: want logits (B,T,V), targets/mask (B,T); got "
                         f"{tuple(logits.shape)}, {tuple(targets.shape)}, {tuple(mask.shape)}")
    keep = mask.bool()                                                  # (B, T)
    # pad / -100 ids -> a safe index
    targets = torch.where(keep, targets, torch.zeros_like(targets))
    # no copy when already float32
    logits = logits.float()
    tok = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)         # (B, T) logit of the target
    tok = tok - torch.logsumexp(logits, dim=-1)                        # (B, T) log pi(y_t | ...)
    return torch.where(keep, tok, torch.zeros_like(tok)).sum(-1)       # (B,) sum, as the paper


def autocast(device, dtype=None):
    """dtype None: bf16 autocast on CUDA, none elsewhere; False: none; a dtype autocasts on any
    device (CPU too)."""
    device = torch.device(device)
    if dtype is False:
        return nullcontext()
    if dtype is None and device.type != "cuda":
        return nullcontext()
    if dtype is None:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, dtype=dtype)


def batch_logps(model, seqs, device, autocast_dtype=None):
    """log pi(y | x) summed over response tokens for [(prompt_ids, response_ids)] -> (logp (B,),
    n_tokens). The fast twin of sequence_logps, tested against it (tests/test_logps.py): one
    right-padded batch; the vocab projection + log-softmax run on the N response positions only,
    fused (model.HeadLogp), so no (B, T, V) logits exist. n_tokens counts prompt and response tokens
    (for throughput logs)."""
    if not seqs or any(len(p) < 1 for p, _ in seqs):
        raise ValueError("batch_logps: need at least one sequence, each with a non-empty prompt")
    T = max(len(p) + len(r) for p, r in seqs)
    # (B, T), pad id 0 is masked out
    idx = torch.zeros(len(seqs), T, dtype=torch.long)
    # (B, T-1) over next-token targets
    mask = torch.zeros(len(seqs), T - 1, dtype=torch.bool)
    for i, (p, r) in enumerate(seqs):
        idx[i, :len(p) + len(r)] = torch.tensor(list(p) + list(r))
        # targets that are response tokens
        mask[i, len(p) - 1:len(p) + len(r) - 1] = True
    idx, sel = idx.to(device), mask.to(device)
    with autocast(device, autocast_dtype):
        # (N,) log pi(y_t | x, y_<t), float32
        tok = model(idx[:, :-1], select=sel, targets=idx[:, 1:][sel])
    # (B, T-1) -> (B,) sum, as the paper
    logp = tok.new_zeros(sel.shape).masked_scatter(sel, tok).sum(-1)
    return logp, sum(len(p) + len(r) for p, r in seqs)


def pair_logps(model, pairs, device, autocast_dtype=None):
    """Stored pairs {"prompt_tokens", "chosen_tokens", "rejected_tokens"} -> (log pi(y+|x) (m,), log
    pi(y-|x) (m,), n_tokens): both sides in one batch_logps call (one right-padded forward)."""
    seqs = [(p["prompt_tokens"], p[f"{side}_tokens"]) for side in ("chosen", "rejected")
            for p in pairs]
    logp, n = batch_logps(model, seqs, device, autocast_dtype)                 # (2m,)
    return logp[:len(pairs)], logp[len(pairs):], n


if __name__ == "__main__":
    from dnolib.model import ModelArgs, Transformer

    torch.manual_seed(0)
    args = ModelArgs(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                     hidden_dim=128, max_seq_len=64)
    model = Transformer(args).eval()
    rnd = lambda n: torch.randint(1, 256, (n,)).tolist()
    pairs = [{"prompt_tokens": rnd(p), "chosen_tokens": rnd(c), "rejected_tokens": rnd(r)}
             for p, c, r in [(5, 3, 7), (2, 6, 1), (9, 4, 4)]]
    with torch.no_grad():
        pos, neg, n_tokens = pair_logps(model, pairs, "cpu")           # (3,), (3,) fused
        # the slow reference: full (B, T, V) logits, one sequence at a time, no padding
        full = []
        for p in pairs:
            for side in ("chosen", "rejected"):
                x, y = p["prompt_tokens"], p[f"{side}_tokens"]
                idx = torch.tensor([x + y])                             # (1, T)
                mask = torch.zeros(1, len(x) + len(y) - 1)
                mask[0, len(x) - 1:] = 1                                # response targets only
                full.append(sequence_logps(model(idx[:, :-1]), idx[:, 1:], mask).item())
    fused = [v for c, r in zip(pos.tolist(), neg.tolist()) for v in (c, r)]
    print(f"3 pairs, {n_tokens} tokens: log pi(y+|x) {[round(v, 3) for v in pos.tolist()]}, "
          f"log pi(y-|x) {[round(v, 3) for v in neg.tolist()]}")
    diff = max(abs(a - b) for a, b in zip(fused, full))
    print(f"fused (batch_logps) vs full logits (sequence_logps): max |difference| {diff:.1e}")

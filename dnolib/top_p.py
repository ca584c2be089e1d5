"""Exact top-p (nucleus) draws of one token per row, without a vocabulary sort on CPU (Alg. 2, line
4: temperature 0.7, top-p 0.95).

    python top_p.py                                   # demo: draw frequencies == the exact nucleus
    from dnolib.top_p import sample_tokens
    tok = sample_tokens(logits, u, temperature=0.7, top_p=0.95)  # (N, V), (N, 3) uniforms -> (N,)

sample.py draws every token with this: the three uniforms per (job, step) come from the job's
seed, so a row's draw depends on nothing else in the batch.

Notes:
 1. top-p keeps the tokens whose higher-probability mass is < top_p (the smallest set reaching
    top_p), as the paper's samplers do; ties at the boundary may resolve differently from
    transformers' warper.
 2. CPU draws top-p samples by rejection (no vocabulary sort), CUDA by sorting: both exact, but the
    same seed gives different samples on the two devices (as does any change of dtype or hardware).
    sample_tokens(sort=True) forces the CUDA path on CPU (the tests check both against the exact
    nucleus distribution).
"""
import torch


def sample_tokens(logits, u, temperature, top_p, sort=None):
    """logits (N, V) float32, u (N, 3) uniforms in [0, 1) -> (N,) token ids; temperature 0 = argmax.
    Top-p nucleus = the tokens whose more-probable mass is < top_p. On CPU, sorting the vocabulary
    every step dominates decode time, so we draw 2 candidates from the full softmax by inverse CDF
    and take the first that lies in the nucleus (rejection sampling: exact, accepted with
    probability >= top_p); rows where both miss fall back to the sorted nucleus with the third
    uniform. On CUDA the sort is cheap and sync-free: always sort. sort: None = sort on CUDA only;
    True / False force either path (tests run the CUDA path on CPU)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # (N, V)
    if top_p < 1 and (probs.is_cuda if sort is None else sort):
        return _sample_sorted(probs, u[:, -1], top_p)
    cand = _inverse_cdf(probs, u[:, :2])  # (N, 2) draws from the full distribution
    tok = cand[:, 0]
    if top_p >= 1:
        return tok
    # rows whose first candidate is rejected
    miss = (~_in_nucleus(probs, tok, top_p)).nonzero()[:, 0]
    if len(miss):
        second = cand[miss, 1]
        tok[miss] = second
        # rows whose second candidate is rejected too: the nucleus itself, from its top k
        both = miss[~_in_nucleus(probs[miss], second, top_p)]
        if len(both):
            tok[both] = _sample_top(probs[both], u[both, 2], top_p)
    return tok


# (N, V), (N,) -> (N,) bool: mass of strictly more likely tokens < top_p
def _in_nucleus(probs, tok, top_p):
    p_tok = probs.gather(1, tok[:, None])  # (N, 1)
    return torch.where(probs > p_tok, probs, 0).sum(-1) < top_p


# probs (N, V) (unnormalised ok), u (N, M) -> (N, M) ids with P(id) = prob / sum
def _inverse_cdf(probs, u):
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[1] - 1)


# probs (N, V), u (N,) -> (N,): inverse CDF over the sorted nucleus
def _sample_sorted(probs, u, top_p):
    probs, order = probs.sort(dim=-1, descending=True)
    probs = probs * ((probs.cumsum(-1) - probs) < top_p)  # keep while the mass above is < top_p
    return order.gather(1, _inverse_cdf(probs, u[:, None]))[:, 0]


# _sample_sorted over the top k tokens only, k x4 until they hold
def _sample_top(probs, u, top_p, k=64):
    V = probs.shape[1]                     # the nucleus (mass >= top_p): no full-vocabulary sort
    while True:
        top, order = probs.topk(min(k, V), dim=-1)  # (N, k) sorted, descending
        if k >= V or bool((top.sum(-1) >= top_p).all()):
            break
        k *= 4
    top = top * ((top.cumsum(-1) - top) < top_p)
    return order.gather(1, _inverse_cdf(top, u[:, None]))[:, 0]


if __name__ == "__main__":
    # 4 tokens of p = 0.5, 0.3, 0.15, 0.05: the 0.7-nucleus is {0, 1}, renormalised 0.625 / 0.375
    n = 100_000
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(n, 4)
    u = torch.rand(n, 3, generator=torch.Generator().manual_seed(0))
    for sort in (False, True):
        freq = torch.bincount(sample_tokens(logits, u, 1.0, 0.7, sort=sort), minlength=4) / n
        print(f"top_p=0.7, {'sorted (CUDA path)' if sort else 'rejection (CPU path)'}: "
              f"frequencies {[round(f, 3) for f in freq.tolist()]}, exact [0.625, 0.375, 0, 0]")

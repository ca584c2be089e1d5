"""optimize.py: line 7 of Algorithm 2 -- pi_{t+1} from pi_t by AdamW on the contrastive loss over
the iteration's (y+, y-) pairs (dno.dno_loss), each rank taking its share of every global batch.

    python optimize.py           # demo: a tiny random Llama learns to prefer one side of 16 pairs

A pair is {"prompt_tokens", "chosen_tokens", "rejected_tokens", "ref_chosen", "ref_rejected",
"r_chosen", "r_rejected"}: token ids, pi_t's log-probs of both sides (the reference, computed
once) and their win-rates r_t.

Departures from the paper (numbered; train.py's departure 5):
    1. lr_t = lr * lr_decay**(t-1) (the paper lowers it in later iterations without saying how);
       linear warmup, then cosine (or linear) decay to 0; AdamW (betas 0.9, 0.95); <= --epochs
       passes over the pairs.
"""
import math
import sys
import time

import torch

import dno
import logps
from dnolib.distributed import rank, sum_over_ranks, world


def pair_len(p):
    """Padded length of a pair's two sequences (both sides share one right-padded batch)."""
    return len(p["prompt_tokens"]) + max(len(p["chosen_tokens"]), len(p["rejected_tokens"]))


def train_step(model, opt, pairs, batch, cfg, device, amp=None):
    """One optimizer step on a global batch of pairs; each rank takes batch[rank::world] in
    micro-batches (gradient accumulation).
    -> float64 tensor [loss sum, margin sum, accuracy sum, pairs, tokens]."""
    batch = sorted(batch, key=lambda i: pair_len(pairs[i]))    # a sum: order is free, pad little
    mine = batch[rank()::world()]
    mb = cfg.micro_batch
    n_micro = math.ceil(math.ceil(len(batch) / world()) / mb)
    acc = torch.zeros(5, dtype=torch.float64)
    for k in range(n_micro):
        chunk = mine[k * mb:(k + 1) * mb]
        weight = 1.0
        if not chunk:                           # every rank runs the same passes (FSDP collectives)
            chunk, weight = batch[:1], 0.0
        if world() > 1:
            model.set_requires_gradient_sync(k == n_micro - 1)
        P = [pairs[i] for i in chunk]
        m = len(chunk)
        logp_c, logp_r, ntok = logps.pair_logps(model, P, device, amp)   # (m,) log pi(y+|x), (y-|x)
        ref = [[p["ref_chosen"], p["ref_rejected"]] for p in P]
        ref = torch.tensor(ref, device=device)          # (m, 2) log pi_t
        r = torch.tensor([[p["r_chosen"], p["r_rejected"]] for p in P], device=device)   # (m, 2)
        target = 1.0                                            # Alg. 2, line 7
        if cfg.target == "soft":
            target = dno.soft_target(r[:, 0], r[:, 1])          # Alg. 1: sigmoid(r+ - r-) (m,)
        losses, st = dno.dno_loss(logp_c, logp_r, ref[:, 0], ref[:, 1], target=target,
                                  eta=cfg.eta)                  # (m,)
        # the mean over the global batch; FSDP averages gradients over ranks, hence * world
        (losses.sum() * (weight * world() / len(batch))).backward()
        sums = [losses.sum().item(), st["margin"].item() * m, st["accuracy"].item() * m, m, ntok]
        acc += weight * torch.tensor(sums, dtype=torch.float64)
    acc = sum_over_ranks(acc, device)
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return acc


def lr_at(cfg, lr_t, s, steps, warm):
    """The lr of step s (0-based): linear warmup over `warm` steps, then cosine or linear decay."""
    if s < warm:
        return lr_t * (s + 1) / warm
    frac = (s + 1 - warm) / max(1, steps - warm)
    if cfg.schedule == "cosine":
        return lr_t * 0.5 * (1 + math.cos(math.pi * frac))
    return lr_t * (1 - frac)


def optimize(model, pairs, cfg, t, device, amp=None):
    """AdamW over <= epochs passes of the pairs, warmup then decay (departure 1). -> step log."""
    from tqdm import tqdm
    lr_t = cfg.lr * cfg.lr_decay ** (t - 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr_t, betas=(0.9, 0.95),
                            weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + t)
    passes = [torch.randperm(len(pairs), generator=g) for _ in range(math.ceil(cfg.epochs))]
    order = torch.cat(passes).tolist()[:max(1, round(len(pairs) * cfg.epochs))]
    steps = math.ceil(len(order) / cfg.batch_size)
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    warm = max(1, round(cfg.warmup * steps))
    log = []
    bar = tqdm(range(steps), disable=rank() != 0, desc=f"train iter {t}", file=sys.stderr)
    for s in bar:
        t0 = time.time()
        lr = lr_at(cfg, lr_t, s, steps, warm)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
        acc = train_step(model, opt, pairs, batch, cfg, device, amp)
        n = acc[3].item()
        log.append({"step": s + 1, "loss": acc[0].item() / n, "margin": acc[1].item() / n,
                    "acc": acc[2].item() / n, "lr": lr})
        if rank() == 0:
            tok_s = acc[4].item() / (time.time() - t0)
            last = log[-1]
            tqdm.write(f"step {s + 1} | loss {last['loss']:.4f} | margin {last['margin']:.4f} | "
                       f"acc {last['acc']:.3f} | lr {lr:.3e} | tok/s {tok_s:.0f}")
    return log


if __name__ == "__main__":
    from dataclasses import replace

    from dnolib.model import ModelArgs, Transformer
    from train import Config
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                     hidden_dim=64, max_seq_len=64)
    model = Transformer(args)
    pairs = [{"prompt_tokens": [1, 2 + i % 5], "chosen_tokens": [10, 11],
              "rejected_tokens": [20, 21], "ref_chosen": 0.0, "ref_rejected": 0.0,
              "r_chosen": 1.0, "r_rejected": 0.0}
             for i in range(16)]
    cfg = replace(Config(), lr=1e-2, batch_size=4, micro_batch=2, epochs=3.0)
    log = optimize(model, pairs, cfg, 1, torch.device("cpu"))
    first, last = log[0], log[-1]
    print(f"{len(log)} steps: loss {first['loss']:.3f} -> {last['loss']:.3f}, "
          f"acc {last['acc']:.2f}")

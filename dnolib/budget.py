"""Memory and CPU-thread budgets: what a model's size needs, worked out from a ModelArgs before
anything is allocated.

    python budget.py                    # memory estimates of the paper's Mistral-7B (no download)
    from dnolib.budget import check_memory, count_params, pick_threads
    check_memory(args, "cuda", micro_batch=8, seq_len=2048, seqs_per_item=2)  # ModelError: no fit
    torch.set_num_threads(pick_threads("auto", count_params(args)))  # threads the size warrants

What lives here: parameter counts by hand from the shapes (count_params, count_lora_params), the
bytes free on a device (free_memory), refusing a config whose weights alone exceed them
(check_fits, called by model.py's loader), a step's memory by part (memory_estimate) and a
one-line ModelError with what to change when it does not fit (check_memory), and the number of
CPU threads a model's size warrants (pick_threads). model_io.py holds the folders, hub ids and
tokenizers; this file never imports model.py.

Notes:
 1. memory_estimate leaves out allocator fragmentation and the CUDA context, so check_memory can
    pass a step that still runs out of memory by a few percent.
"""
import os

import torch

from dnolib.model_io import ModelError


def count_params(args) -> int:
    """Parameters of model.Transformer(args: model.ModelArgs), counted by hand from the shapes (no
    allocation)."""
    C, F, H, K, D = args.dim, args.hidden_dim, args.n_heads, args.n_kv_heads, args.head_dim
    # q, o (C x H D); k, v (C x K D)
    attn = 2 * C * H * D + 2 * C * K * D
    attn += (H * D + 2 * K * D) * args.qkv_bias + C * args.o_bias + 2 * D * args.qk_norm
    mlp = 3 * C * F + (2 * F + C) * args.mlp_bias                         # gate, up, down
    layer = attn + mlp + 2 * C                                            # + two RMSNorms
    return args.vocab_size * C * (1 if args.tie_embeddings else 2) + C + args.n_layers * layer


def count_lora_params(args, rank) -> int:
    """Parameters lora.add_lora(rank) adds: r (in + out) per adapted projection (q, k, v, o, gate,
    up, down)."""
    C, F, H, K, D = args.dim, args.hidden_dim, args.n_heads, args.n_kv_heads, args.head_dim
    per_layer = (C + H * D) * 2 + (C + K * D) * 2 + (C + F) * 3
    return rank * per_layer * args.n_layers


def free_memory(device):
    """Bytes free on device now: CUDA mem_get_info, CPU /proc/meminfo MemAvailable; None when
    unknown (then nothing is checked). A container's cgroup limit is not read: its page cache would
    make it look full."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] if torch.cuda.is_available() else None
    if device.type != "cpu":  # mps, meta: unknown
        return None
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f
                        if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):  # not Linux
        return None


def check_fits(args, device, dtype, source):
    """Refuse a config whose weights alone exceed the free memory, before the loader allocates (or
    loops) at all."""
    n, free = count_params(args), free_memory(device)
    if free is not None and n * dtype.itemsize > free:
        raise ModelError(f"{source}: {n:,} parameters (num_hidden_layers={args.n_layers}, hidden_size={args.dim}) "
                         f"need {n * dtype.itemsize / 2**30:.1f} GiB in {dtype} but {device} has "
                         f"{free / 2**30:.1f} GiB free")


def memory_estimate(args, *, micro_batch, seq_len, train=True, grad_ckpt=False, param_bytes=4, optimizer="adamw",
                    act_bytes=2, seqs_per_item=1, shards=1, lora_rank=0) -> dict:
    """Bytes one rank needs for a step on micro_batch items of seq_len tokens (seqs_per_item
    sequences each: 2 for a DNO pair). Weights, gradients and the optimizer state (AdamW: exp_avg
    and exp_avg_sq in the parameter dtype, fp32 in train.py; sgd: none) are split over `shards` FSDP
    ranks. Activations kept for backward, per token, C = dim, H/K = query/kv heads, D = head_dim, F
        = hidden_dim, a = act_bytes (2 under bf16 autocast, 4 in fp32): per layer   16 C + 4 H
                  fp32 residual input and normalised output of both RMSNorms, the + a (2HD + 2KD +
                                               4F)         attention's logsumexp; q, k, v, attention
                                                           output, gate, up, silu(gate), their
                                                           product
                  + a 2C, or a 5C (autocast)   the matmul inputs: both norm outputs, or under
                                               autocast the cast copy each of the five q/k/v/gate/up
                                               matmuls keeps
        grad_ckpt   4 C per layer (the block input), plus one layer's full set recomputed during
                    backward
        head        a (V + C) + 8 C            HeadLogp's (N, V) exp buffer and input, the final
                    norm (N <= tokens)
    weight_copies: a bytes per matmul weight, the cast weights kept for backward (autocast is
    assumed when a < param_bytes and shards == 1; FSDP2's MixedPrecisionPolicy hands the blocks bf16
    weights, no cast). lora_rank r > 0 (lora.py): the frozen weights get no gradients and no
    optimizer state; only the adapters' count_lora_params do (their activations, r per token per
    projection, are left out). Not training (generation, sample.py): a KV cache of 2 K D a per
    token per layer, one layer's working set and (B, V) float32 logits. The estimate leaves out
    allocator fragmentation and the CUDA context."""
    if optimizer not in ("adamw", "sgd"):
        raise ModelError(f"optimizer must be adamw or sgd, got {optimizer!r}")
    C, F, H, K, D, V, L = (args.dim, args.hidden_dim, args.n_heads, args.n_kv_heads, args.head_dim, args.vocab_size,
                           args.n_layers)
    B = micro_batch * seqs_per_item
    tokens, n = B * seq_len, count_params(args)
    # autocast: matmuls keep cast copies of their inputs and weights for backward
    cast = act_bytes < param_bytes
    # per token
    layer = 16 * C + 4 * H + act_bytes * (2 * H * D + 2 * K * D + 4 * F + (5 if cast else 2) * C)
    if train:
        kept = 4 * C * L + layer if grad_ckpt else layer * L
        # the embedding is no matmul; under FSDP (MixedPrecisionPolicy) the weights arrive in
        # bf16 already
        copies = (n - V * C * (not args.tie_embeddings)) * act_bytes * cast * (shards == 1)
        act, kv = tokens * (kept + act_bytes * (V + C) + 8 * C), 0
    else:
        copies, act, kv = 0, tokens * layer + B * V * 4, tokens * L * 2 * K * D * act_bytes
    n_lora = count_lora_params(args, lora_rank)
    weights = (n + n_lora) * param_bytes // shards
    trained = n_lora * param_bytes // shards if lora_rank else weights
    grads = trained if train else 0
    opt = 2 * trained if train and optimizer == "adamw" else 0
    return dict(params=n + n_lora, weights=weights, grads=grads, optimizer=opt, weight_copies=copies, activations=act,
                kv_cache=kv, total=weights + grads + opt + copies + act + kv)


PARAMS_PER_THREAD = 25_000_000  # pick_threads: a model gets one CPU thread per this many parameters


def pick_threads(spec, n_params) -> int:
    """--threads -> torch's intra-op threads: an integer as given, or "auto": one thread per
    PARAMS_PER_THREAD parameters, at least 1 and at most the cores this process may run on
    (os.sched_getaffinity) shared among the torchrun ranks of this machine (LOCAL_WORLD_SIZE), and
    at most OMP_NUM_THREADS when it is set. Why: a thread pays off only when each matmul has enough
    work to share; torch's default (one thread per core) makes a tiny model wait at every op for a
    core that another process holds. Measured on the shared 2-core machine, 30 SFT steps of the
    demo's 0.14M-parameter Llama (demo_sft.sft), each in a fresh process: beside a 2-job compile
    (load 3-4), 2 threads took 41-55 s wall and 32-46 CPU-s, 1 thread 10-18 s and 9-11 CPU-s; with
    two busy loops more (load 12-15), 2 threads 226-272 s and 53-55 CPU-s, 1 thread 58-62 s and 9-11
    CPU-s. (The machine was never idle while this was measured, so PARAMS_PER_THREAD, where a second
    thread starts to pay on an idle machine, is a judgment, not a measured crossover.) Callers apply
    it: torch.set_num_threads(pick_threads(cfg.threads, n_params))."""
    s = str(spec).strip().lower()
    if s != "auto":
        if not s.isdigit() or int(s) < 1:
            raise ValueError(f"--threads must be auto or an integer >= 1; got {spec!r}")
        return int(s)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    omp = os.environ.get("OMP_NUM_THREADS", "")
    cap = min(cores, int(omp)) if omp.isdigit() and int(omp) >= 1 else cores
    return max(1, min(cap, n_params // PARAMS_PER_THREAD))


# memory_estimate's sums
PARTS = ("weights", "grads", "optimizer", "weight_copies", "activations", "kv_cache")


def check_memory(args, device, **kw) -> dict:
    """memory_estimate(args, **kw) plus free=bytes free on device; a one-line ModelError with what
    to change when the total does not fit. Call it before loading or training so a run fails in
    seconds, not at the first OOM. act_bytes, unless given, follows train.py: bf16 autocast (2) on
    CUDA, float32 (4) elsewhere."""
    kw.setdefault("act_bytes", 2 if torch.device(device).type == "cuda" else 4)
    est = memory_estimate(args, **kw)
    est["free"] = free = free_memory(device)
    if free is None or est["total"] <= free:
        return est
    fixed = est["weights"] + est["grads"] + est["optimizer"] + est["weight_copies"]
    # activations and KV cache grow with the micro-batch
    per_item = (est["total"] - fixed) / kw["micro_batch"]
    fit = int((free - fixed) // per_item) if free > fixed else 0
    hints = [f"lower --micro_batch to {fit}"] if fit >= 1 else []
    ckpt = dict(kw, grad_ckpt=True)
    if kw.get("train", True) and not kw.get("grad_ckpt") and memory_estimate(args, **ckpt)["total"] <= free:
        hints.append("pass --grad_ckpt true")
    hints = hints or ["use a larger device, or shard over more GPUs with torchrun" if fixed > free
                      else "shorten the sequences or use a larger device"]
    g = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    parts = " + ".join(f"{k.replace('_', ' ')} {g(est[k])}" for k in PARTS if est[k])
    raise ModelError(f"needs ~{g(est['total'])} GiB on {device} ({parts}) but {g(free)} GiB is free: "
                     f"{' or '.join(hints)}")


if __name__ == "__main__":
    from dnolib.model import ModelArgs  # the demo only: this module never imports model.py at import time

    mistral7b = ModelArgs(arch="mistral", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                          head_dim=128, hidden_dim=14336)
    # the paper's model, one pair per micro-batch, 2048
    for ckpt, r in ((False, 0), (True, 0), (True, 16)):
        est = memory_estimate(mistral7b, micro_batch=1, seq_len=2048, seqs_per_item=2, grad_ckpt=ckpt,
                              lora_rank=r)  # tokens, bf16 autocast, one rank
        print(f"Mistral-7B train step, grad_ckpt={ckpt}, lora_rank={r}: " + ", ".join(f"{k} {v / 2**30:.1f} GiB"
              for k, v in est.items() if k != "params") + f" ({est['params']:,} params)")
    est = memory_estimate(mistral7b, micro_batch=16, seq_len=2048, seqs_per_item=5, train=False,
                          param_bytes=2)
    print(f"Mistral-7B sampling, 16 prompts x 5 samples x 2048 tokens, bf16: {est['total'] / 2**30:.1f} GiB "
          f"(KV cache {est['kv_cache'] / 2**30:.1f} GiB)")
    free = free_memory("cpu")
    print(f"free on cpu now: {free / 2**30:.1f} GiB" if free is not None
          else "free on cpu: unknown")

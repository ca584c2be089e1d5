"""Sampler throughput with EOS on: continuous batching vs batches of 16, lock-step, transformers.

    nice -n 10 env OMP_NUM_THREADS=1 python bench/bench_eos.py  # CPU, a 5.1M-param Llama, minutes
    python bench/bench_eos.py --device cuda             # Qwen2.5-0.5B-shaped random model in bf16
    nice -n 10 env OMP_NUM_THREADS=1 python bench/bench_eos.py --big true --max_new_tokens 128 \
        --vllm_python /tmp/vllmvenv/bin/python      # 58.5M Llama, + vLLM's CPU build (eos_vllm.py)

Workload: 64 prompts x K=5 samples, max 256 new tokens, temperature 0.7, top-p 0.95, with a stop
set whose summed mean probability under the (random) model is 1 / (max_new_tokens / 8): sample
lengths are about geometric with a mean of 32 tokens and a long tail, as real answers are. The stop
ids are picked by measuring each token's mean next-token probability on sampled text, then taking
random ids until their mass reaches the target. Samplers on the same weights and prompts, measured
in one process:
  ours          generate(rows=--rows; 0 = default_rows, sized from memory as train.py does):
                continuous batching, the batch stays full until the queue is empty
  batches-16    one generate() call per 16 prompts (rows = 16 K, all in flight), finished rows
                dropped: the schedule train.py used before continuous batching, same decode step
  lock-step     the same calls with compact=False: every row decodes to its batch's longest
  transformers  AutoModelForCausalLM.generate, 16 prompts per call, eos_token_id = the stop set
  vLLM          --vllm_python PATH: its CPU build in its own venv, run by bench/eos_vllm.py on
                the same saved model, prompts and stop ids (its start and compile not timed);
                else "not installed"
Useful tokens = each sample's tokens up to and including its stop id; rates are useful tokens per
CPU-second (time.process_time, all threads) and per wall second. matmul bound: the CPU time of the
decode step's matmuls alone (x W^T for every projection and the head, at ours' rows, measured here)
times the steps ours needs (useful tokens / rows): the share of ours' CPU time that bound is.
"same samples" checks that every sampler of ours drew the same per-sample lengths.
"""
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import time  # noqa: E402
from bench_sample import bench_model, timed  # noqa: E402
from eos_vllm import run_vllm  # noqa: E402
from dnolib.model import Transformer  # noqa: E402
from dnolib.cli import cli  # noqa: E402
from sample import default_rows, generate, left_pad  # noqa: E402


@dataclass
class Config:
    device: str = "cpu"           # cpu | cuda
    num_prompts: int = 64
    num_samples: int = 5          # K
    rows: int = 0                 # rows in flight for ours; 0 = sized from memory, as train.py
    max_new_tokens: int = 256
    mean_frac: float = 8.0        # target mean sample length = max_new_tokens / mean_frac
    prompt_len: int = 32          # prompts get lengths in [prompt_len // 2, prompt_len]
    temperature: float = 0.7      # the paper's sampling settings
    top_p: float = 0.95
    threads: int = 1              # CPU threads for every sampler (the dev box is shared)
    repeats: int = 1              # timed runs per sampler; the best is reported (rerun for spread)
    skip_hf: bool = False         # no transformers side
    big: bool = False             # CPU: a 58.5M Llama (8 heads of 64, as issue 18's vLLM run)
    vllm_python: str = ""         # a python that imports vllm (its CPU build): adds its row


@torch.no_grad()
def pick_stop_ids(model, prompts, cfg):
    """Random token ids whose summed mean next-token probability (at the sampling temperature) is
    about 1 / target mean length, measured on 64 sampled tokens of a few prompts."""
    outs = generate(model, None, prompts[:4], num_samples=2, max_new_tokens=64,
                    temperature=cfg.temperature, top_p=cfg.top_p, stop_ids=[])
    seqs = [p + s["tokens"] for p, o in zip(prompts, outs) for s in o]
    idx, mask = (t.to(model.lm_head.weight.device) for t in left_pad(seqs))
    probs = torch.softmax(model(idx, mask)[:, -64:] / cfg.temperature, -1)  # (B, 64, V)
    mean = probs.mean((0, 1)).cpu()  # (V,) mean next-token probability
    order = torch.randperm(len(mean), generator=torch.Generator().manual_seed(1))
    cum = mean[order].cumsum(0)
    k = int(torch.searchsorted(cum, cfg.mean_frac / cfg.max_new_tokens)) + 1
    return sorted(order[:k].tolist()), cum[k - 1].item()


def ours(model, prompts, cfg, stops, n_new, **kw):
    outs = generate(model, None, prompts, num_samples=cfg.num_samples, max_new_tokens=n_new,
                    temperature=cfg.temperature, top_p=cfg.top_p, stop_ids=stops, **kw)
    # useful tokens: the response and its stop id
    return [len(s["tokens"]) + (s["finish_reason"] == "stop") for o in outs for s in o]


def in_batches(model, prompts, cfg, stops, n_new, per_call=16, **kw):
    """ours() on per_call prompts per generate() call; ids keep each sample's seed as in ours."""
    lens = []
    for s in range(0, len(prompts), per_call):
        chunk = prompts[s:s + per_call]
        lens += ours(model, chunk, cfg, stops, n_new, ids=range(s, s + len(chunk)), **kw)
    return lens


def hf(model, prompts, cfg, stops, n_new, per_call=16):
    lens = []
    for s in range(0, len(prompts), per_call):
        idx, mask = left_pad(prompts[s:s + per_call])
        with torch.no_grad():
            out = model.generate(idx.to(cfg.device), attention_mask=mask.to(cfg.device),
                                 max_new_tokens=n_new, do_sample=True, temperature=cfg.temperature,
                                 top_p=cfg.top_p, top_k=0, eos_token_id=stops, pad_token_id=0,
                                 num_return_sequences=cfg.num_samples)
        new = out[:, idx.shape[1]:].cpu()  # (N, L); finished rows are padded after their stop id
        hit = torch.isin(new, torch.tensor(stops))
        first = hit.int().argmax(1) + 1  # (N,) tokens up to and including the stop
        lens += torch.where(hit.any(1), first, new.shape[1]).tolist()
    return lens


@torch.no_grad()
def matmul_seconds(model, rows, steps=20):
    """CPU seconds of one decode step's matmuls alone at `rows` rows (median of `steps`)."""
    ws = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(rows, w.shape[1], dtype=w.dtype, device=w.device) for w in ws]
    times = []
    for _ in range(steps):
        t = time.process_time()
        for x, w in zip(xs, ws):
            x @ w.t()
        times.append(time.process_time() - t)
    return sorted(times)[steps // 2]


def main():
    cfg = cli(Config)
    if cfg.vllm_python and shutil.which(cfg.vllm_python) is None:
        sys.exit(f"error: --vllm_python {cfg.vllm_python}: no such program")
    torch.set_num_threads(cfg.threads)
    from transformers import AutoModelForCausalLM

    args, dtype = bench_model(cfg.device)
    if cfg.big and cfg.device == "cpu":
        args = replace(args, vocab_size=32000, dim=512, n_layers=8, n_heads=8, head_dim=64,
                       hidden_dim=1664)
    args.max_seq_len = max(args.max_seq_len, cfg.prompt_len + cfg.max_new_tokens)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    lo, hi = cfg.prompt_len // 2, cfg.prompt_len + 1
    lengths = torch.randint(lo, hi, (cfg.num_prompts,), generator=g)
    prompts = [torch.randint(3, args.vocab_size, (int(n),), generator=g).tolist() for n in lengths]
    with torch.device(cfg.device):
        model = Transformer(args).to(dtype).eval()
    stops, mass = pick_stop_ids(model, prompts, cfg)
    rows = cfg.rows or min(default_rows(model, cfg.prompt_len, cfg.max_new_tokens),
                           cfg.num_prompts * cfg.num_samples)
    K16 = 16 * cfg.num_samples
    samplers = [("ours", lambda n: ours(model, prompts, cfg, stops, n, rows=rows)),
                ("batches-16", lambda n: in_batches(model, prompts, cfg, stops, n, rows=K16)),
                ("lock-step", lambda n: in_batches(model, prompts, cfg, stops, n, rows=K16,
                                                   compact=False))]
    if not cfg.skip_hf:
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            hf_model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(cfg.device).eval()
        samplers.append(("transformers", lambda n: hf(hf_model, prompts, cfg, stops, n)))
    print(f"{cfg.device}: {args.arch} {model.num_params() / 1e6:.1f}M params {str(dtype)[6:]}, "
          f"threads={cfg.threads}, {cfg.num_prompts} prompts x K={cfg.num_samples}, rows={rows}, "
          f"max {cfg.max_new_tokens} new tokens, T={cfg.temperature}, top_p={cfg.top_p}; "
          f"{len(stops)} stop ids with mean probability {mass:.4f} "
          f"(target mean length {cfg.max_new_tokens / cfg.mean_frac:.0f})", flush=True)
    rate, got = {}, {}
    print(f"  {'sampler':13s} {'useful tok':>10s} {'mean len':>8s} {'max len':>7s} {'CPU s':>7s} "
          f"{'wall s':>7s} {'tok/CPU-s':>9s} {'tok/wall-s':>10s}", flush=True)
    for label, fn in samplers:
        fn(8)  # warm-up
        best = None
        for _ in range(cfg.repeats):
            lens, cpu, wall = timed(lambda: fn(cfg.max_new_tokens), cfg.device)
            if best is None or cpu < best[1]:
                best = lens, cpu, wall
        lens, cpu, wall = best
        rate[label], got[label] = sum(lens) / cpu, lens
        print(f"  {label:13s} {sum(lens):10d} {sum(lens) / len(lens):8.1f} {max(lens):7d} "
              f"{cpu:7.2f} {wall:7.2f} {rate[label]:9.0f} {sum(lens) / wall:10.0f}", flush=True)
        if label == "ours":
            wall_rate = sum(lens) / wall
        if label == "ours" and cfg.device == "cpu":
            share = sum(lens) / rows * matmul_seconds(model, rows) / cpu
    # vLLM in its own venv, as a child process (bench/eos_vllm.py): same folder, prompts, stops
    vllm = "not installed (--vllm_python: a python that imports vllm)"
    if cfg.vllm_python:
        vllm = run_vllm(cfg.vllm_python, model, prompts, stops, cfg)
    if isinstance(vllm, str):
        print(f"  {'vLLM':13s} {vllm}", flush=True)
    else:
        lens, cpu, wall = vllm["lens"], vllm["cpu"], vllm["wall"]
        rate["vLLM"] = sum(lens) / cpu
        print(f"  {'vLLM':13s} {sum(lens):10d} {sum(lens) / len(lens):8.1f} {max(lens):7d} "
              f"{cpu:7.2f} {wall:7.2f} {rate['vLLM']:9.0f} {sum(lens) / wall:10.0f}"
              f"  (vLLM {vllm['version']}, max_num_seqs {vllm['max_num_seqs']})", flush=True)
        cpus = ", ".join(f"{n} {t:.1f}" for n, t in vllm["per_process"].items())
        print(f"  {'':13s} vLLM's CPU s by process: {cpus}", flush=True)
    for other in ("batches-16", "lock-step", "transformers", "vLLM"):
        if other in rate:
            ratio = rate["ours"] / rate[other]
            print(f"  ratio ours / {other} = {ratio:.2f}x (useful tokens per CPU-second)",
                  flush=True)
    same = all(got[k] == got["ours"] for k in ("batches-16", "lock-step"))
    print(f"  same samples (ours, batches-16, lock-step): {'yes' if same else 'NO'}", flush=True)
    if "vLLM" in rate:
        print(f"  ratio ours / vLLM = {wall_rate / (sum(lens) / wall):.2f}x (per wall second)",
              flush=True)
    if cfg.device == "cpu":
        print(f"  matmul bound share of ours: {share:.0%}", flush=True)


if __name__ == "__main__":
    main()

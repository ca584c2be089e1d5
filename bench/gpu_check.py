"""bench/gpu_check.py: the one-GPU check, one table (run it through bench/gpu_check.sh).

    bash bench/gpu_check.sh                       # on one GPU: < 8 min on an H100 (estimate)
    VLLM_PYTHON=~/vllm-venv/bin/python bash bench/gpu_check.sh   # + ours vs vLLM, same prompts
    python bench/gpu_check.py --only decode       # one check

Rows, each on a random model of Qwen2.5-0.5B's shape (bench_sample.bench_model) in bf16:
  tests        the GPU-marked tests (pytest -m gpu); "none marked" when there are none
  hbm          device-to-device copy bandwidth (GB/s), the bound the decode rows are held to
  decode b=1   our sampler's tokens/s at 1 row, against weights + KV bytes per step / bandwidth
  decode full  tokens/s at the rows default_rows picks (the batch kept full), 64 x K=4 prompts
  compiled     compile=True (CUDA graphs) vs eager at 1 row: tokens/s, and greedy tokens equal
  train MFU    one optimizer step on 8 pairs of 2 x 1,024 tokens: 6 N tokens / time / peak bf16
  memory       budget.memory_estimate for that step vs torch.cuda.max_memory_allocated
  fsdp2        fully_shard on nccl with one rank (torchrun): the same loss as unsharded
  vLLM         bench/bench_eos.py --device cuda with --vllm_python $VLLM_PYTHON (if set)
A check that fails prints "failed: <its last line>" in its row; the others still run.
"""
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from dnolib.cli import cli  # noqa: E402

# dense bf16 peak, FLOP/s (no sparsity), by the device name's key
PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


@dataclass
class Config:
    only: str = ""                # run one check (tests|decode|train|fsdp2|vllm); "" = all
    new_tokens: int = 256         # decode steps per decode check
    vllm_python: str = ""         # a python that imports vllm; "" = $VLLM_PYTHON


def sync():
    torch.cuda.synchronize()


def hbm_bandwidth():
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted)."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    return 2 * 10 * x.numel() / (time.perf_counter() - t)


def model_and_prompts(n, seed=0):
    from bench_sample import bench_model
    from dnolib.model import Transformer

    args, dtype = bench_model("cuda")
    args.max_seq_len = 4096
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = Transformer(args).to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, args.vocab_size, (128,), generator=g).tolist() for _ in range(n)]
    return model, prompts


def decode_rate(model, prompts, K, n_new, rows, compile=False, temperature=0.7):
    from sample import generate

    kw = dict(num_samples=K, max_new_tokens=n_new, temperature=temperature, stop_ids=[], rows=rows,
              compile=compile)
    generate(model, None, prompts[:1], **{**kw, "max_new_tokens": 8})   # warm-up (and compile)
    sync()
    t = time.perf_counter()
    outs = generate(model, None, prompts, **kw)
    sync()
    n = sum(len(s["tokens"]) for o in outs for s in o)
    return n / (time.perf_counter() - t), outs


def check_decode(cfg, rows):
    from sample import default_rows

    bw = hbm_bandwidth()
    rows.append(("hbm", f"{bw / 1e9:.0f} GB/s device-to-device copy"))
    model, prompts = model_and_prompts(64)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    a = model.args
    kv_tok = 2 * a.n_layers * a.n_kv_heads * a.head_dim * 2          # bf16 K and V, per token
    step = weights + kv_tok * (128 + cfg.new_tokens // 2)             # bytes read per step
    one, _ = decode_rate(model, prompts[:1], 1, cfg.new_tokens, 1)
    rows.append(("decode b=1", f"{one:.0f} tok/s = {one / (bw / step):.0%} of the bandwidth "
                               f"bound {bw / step:.0f} tok/s ({step / 1e9:.2f} GB per step)"))
    full_rows = default_rows(model, 128, cfg.new_tokens)
    full, _ = decode_rate(model, prompts, 4, cfg.new_tokens, full_rows)
    rows.append(("decode full", f"{full:.0f} tok/s at {full_rows} rows (64 prompts x K=4)"))
    eager, e_out = decode_rate(model, prompts[:4], 1, cfg.new_tokens, 4, temperature=0)
    comp, c_out = decode_rate(model, prompts[:4], 1, cfg.new_tokens, 4, compile=True,
                              temperature=0)
    same = sum(a[0]["tokens"] == b[0]["tokens"] for a, b in zip(e_out, c_out))
    rows.append(("compiled", f"{comp:.0f} vs eager {eager:.0f} tok/s (x{comp / eager:.2f}) at "
                             f"4 rows, bf16; greedy equal on {same}/4 prompts"))


def train_pairs(vocab, n, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()   # noqa: E731
    return [(rnd(T // 4), rnd(3 * T // 4)) for _ in range(2 * n)]       # 2 sequences per pair


def check_train(cfg, rows):
    from dno import batch_logps
    from dnolib.budget import memory_estimate

    model, _ = model_and_prompts(1)
    model = model.float().train()                       # fp32 weights, bf16 autocast (train.py)
    seqs = train_pairs(model.args.vocab_size, 8, 1024)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step():
        logp, _ = batch_logps(model, seqs, "cuda", torch.bfloat16)
        logp.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()                                              # warm-up: AdamW state allocated
    torch.cuda.reset_peak_memory_stats()
    sync()
    t = time.perf_counter()
    step()
    sync()
    dt = time.perf_counter() - t
    n_params = sum(p.numel() for p in model.parameters())
    tokens = sum(len(p) + len(r) for p, r in seqs)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK.items() if k in name), None)
    flops = 6 * n_params * tokens / dt
    mfu = f"{flops / peak:.0%} MFU of {peak / 1e12:.0f} TFLOP/s" if peak else "peak unknown"
    rows.append(("train MFU", f"{flops / 1e12:.0f} TFLOP/s = {mfu} ({tokens} tokens in "
                              f"{dt:.2f}s, 6 N tokens)"))
    est = memory_estimate(model.args, micro_batch=8, seq_len=1024, seqs_per_item=2)["total"]
    got = torch.cuda.max_memory_allocated()
    rows.append(("memory", f"estimate {est / 2**30:.1f} GiB vs measured peak {got / 2**30:.1f} "
                           f"GiB (x{got / est:.2f})"))


FSDP_CHILD = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.getcwd()); sys.path.insert(0, "bench")
from torch.distributed.fsdp import fully_shard
from gpu_check import model_and_prompts, train_pairs
from dno import batch_logps
dist.init_process_group("nccl"); torch.cuda.set_device(0)
model, _ = model_and_prompts(1); model = model.float()
seqs = train_pairs(model.args.vocab_size, 2, 256)
ref = batch_logps(model, seqs, "cuda", torch.bfloat16)[0].sum().item()
for block in model.layers:
    fully_shard(block)
fully_shard(model)
got = batch_logps(model, seqs, "cuda", torch.bfloat16)[0]
got.sum().backward()
print(f"FSDP2 nccl world {dist.get_world_size()}: sum log p {got.sum().item():.4f} vs unsharded "
      f"{ref:.4f}, backward ok")
dist.destroy_process_group()
"""


def run_child(argv, timeout, env=None):
    """A child command -> (ok, its last non-empty output line)."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                           env=env)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout}s"
    lines = [s for s in (r.stdout + r.stderr).splitlines() if s.strip()]
    return r.returncode == 0, lines[-1] if lines else f"exit {r.returncode}"


def check_tests(cfg, rows):
    ok, last = run_child([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], 240)
    rows.append(("tests", last if ok or "no tests ran" not in last else "none marked gpu"))


def check_fsdp2(cfg, rows):
    ok, last = run_child(["torchrun", "--nproc_per_node=1", "--no-python", sys.executable, "-c",
                          FSDP_CHILD], 180)
    rows.append(("fsdp2", last if ok else f"failed: {last}"))


def check_vllm(cfg, rows):
    python = cfg.vllm_python or os.environ.get("VLLM_PYTHON", "")
    if not python:
        rows.append(("vLLM", "not run (set VLLM_PYTHON to a python that imports vllm)"))
        return
    ok, last = run_child([sys.executable, "bench/bench_eos.py", "--device", "cuda", "--skip_hf",
                          "true", "--vllm_python", python], 300)
    rows.append(("vLLM", last if ok else f"failed: {last}"))


CHECKS = {"tests": check_tests, "decode": check_decode, "train": check_train,
          "fsdp2": check_fsdp2, "vllm": check_vllm}


def main():
    cfg = cli(Config)
    if not torch.cuda.is_available():
        print("bench/gpu_check: needs a CUDA GPU (none here); nothing measured")
        return
    rows = []
    t0 = time.perf_counter()
    for name, fn in CHECKS.items():
        if cfg.only and name != cfg.only:
            continue
        try:
            fn(cfg, rows)
        except Exception as e:                          # one failed check, the rest still run
            rows.append((name, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"))
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{time.perf_counter() - t0:.0f}s")
    w = max(len(n) for n, _ in rows)
    print("\n".join(f"  {n:{w}s} | {v}" for n, v in rows))


if __name__ == "__main__":
    main()

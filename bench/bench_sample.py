"""Sampler throughput: our generate() vs transformers' generate(), same random model and prompts.

    nice -n 10 env OMP_NUM_THREADS=1 python bench/bench_sample.py  # CPU: 5.1M-param Llama, minutes
    python bench/bench_sample.py --device cuda          # Qwen2.5-0.5B-shaped random model, bf16
    python bench/bench_sample.py --device cuda --compile true   # + compiled decode (CUDA graphs)

Workload (issue 2): 16 prompts x K=5 samples x 128 new tokens, temperature 0.7, top-p 0.95, EOS
ignored (stop_ids=[] for us; no eos and top_k=0 for transformers). Both read the same safetensors
folder; ours runs all 80 (prompt, sample) jobs as rows at once (rows=num_prompts*K), as transformers
does. Prints generated tokens per CPU-second (time.process_time, all threads: fair on a shared
machine) and per wall second, and the ratios. On CUDA it also times batch-1 greedy decode against
the memory-bandwidth bound: bytes of weights read per token / HBM bandwidth.
"""
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dnolib.model import ModelArgs, Transformer  # noqa: E402
from dnolib.cli import cli  # noqa: E402
from sample import generate, left_pad  # noqa: E402

HBM_GBPS = {"H200": 4800, "H100": 3350, "A100": 2039}  # GPU name part -> memory bandwidth, GB/s


@dataclass
class Config:
    device: str = "cpu"           # cpu | cuda
    num_prompts: int = 16
    num_samples: int = 5          # K
    max_new_tokens: int = 128
    prompt_len: int = 32          # prompts get lengths in [prompt_len // 2, prompt_len]
    temperature: float = 0.7      # the paper's sampling settings
    top_p: float = 0.95
    threads: int = 1              # CPU threads for both sides (the dev box is shared)
    compile: bool = False         # our decode step under torch.compile(mode="reduce-overhead")
    hbm_gbps: float = 0.0         # memory bandwidth for the bound; 0 = guess from the GPU name
    batch1_tokens: int = 256      # tokens timed in the batch-1 decode measurement (cuda)
    skip_hf: bool = False         # our sampler only (no transformers side)


def bench_model(device):
    if device == "cpu":  # a few-M-param Llama (GQA): small enough for a shared 2-core box
        args = ModelArgs(arch="llama", vocab_size=4096, dim=256, n_layers=4, n_heads=8,
                         n_kv_heads=2, head_dim=32, hidden_dim=768, max_seq_len=2048,
                         rope_theta=5e5, eos_token_id=2)
        return args, torch.float32
    # Qwen2.5-0.5B's shape: 24 layers, 896 wide, 14 q / 2 kv heads, qkv bias, tied embeddings
    args = ModelArgs(arch="qwen2", vocab_size=151936, dim=896, n_layers=24, n_heads=14,
                     n_kv_heads=2, head_dim=64, hidden_dim=4864, max_seq_len=32768, rope_theta=1e6,
                     qkv_bias=True, tie_embeddings=True, eos_token_id=151645)
    return args, torch.bfloat16


def timed(fn, device):
    """fn() -> (result, CPU seconds of this process, wall seconds)."""
    if device == "cuda":
        torch.cuda.synchronize()
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.process_time() - c, time.perf_counter() - w


def hf_generate(hf, prompts, cfg, n_new, do_sample=True, K=None):
    idx, mask = left_pad(prompts)
    idx, mask = idx.to(cfg.device), mask.to(cfg.device)
    kw = dict(do_sample=False)
    if do_sample:
        kw = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
    with torch.no_grad():
        out = hf.generate(idx, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                          eos_token_id=None, pad_token_id=0,
                          num_return_sequences=K or cfg.num_samples, **kw)
    return out.shape[0] * (out.shape[1] - idx.shape[1])


def ours_generate(model, prompts, cfg, n_new, temperature=None, K=None):
    K = K or cfg.num_samples
    T = cfg.temperature if temperature is None else temperature
    outs = generate(model, None, prompts, num_samples=K, max_new_tokens=n_new, temperature=T,
                    top_p=cfg.top_p, stop_ids=[], rows=len(prompts) * K, compile=cfg.compile)
    return sum(len(s["tokens"]) for o in outs for s in o)


def batch1(model, hf, prompt, cfg):
    """Batch-1 greedy decode ms/token (prefill excluded: two lengths differenced) vs the bound."""
    name = torch.cuda.get_device_name()
    gbps = cfg.hbm_gbps or next((v for k, v in HBM_GBPS.items() if k in name), 0)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
    sides = [("ours", lambda n: ours_generate(model, [prompt], cfg, n, temperature=0, K=1))]
    if hf is not None:
        greedy_hf = lambda n: hf_generate(hf, [prompt], cfg, n, do_sample=False, K=1)
        sides.append(("transformers", greedy_hf))
    rows = []
    for label, fn in sides:
        fn(16), fn(16 + cfg.batch1_tokens)  # warm-up (and compile both cache sizes)
        _, _, t_short = timed(lambda: fn(16), "cuda")
        _, _, t_long = timed(lambda: fn(16 + cfg.batch1_tokens), "cuda")
        rows.append((label, (t_long - t_short) / cfg.batch1_tokens * 1e3))
    bound = nbytes / (gbps * 1e9) * 1e3 if gbps else float("nan")
    print(f"batch-1 decode on {name}: weights {nbytes / 1e9:.2f} GB, bandwidth bound {bound:.3f} "
          f"ms/token ({gbps:.0f} GB/s)", flush=True)
    for label, ms in rows:
        print(f"  {label:13s} {ms:.3f} ms/token = {bound / ms:.0%} of the bound", flush=True)


def main():
    cfg = cli(Config)
    torch.set_num_threads(cfg.threads)
    from transformers import AutoModelForCausalLM

    args, dtype = bench_model(cfg.device)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    lo, hi = cfg.prompt_len // 2, cfg.prompt_len + 1
    lengths = torch.randint(lo, hi, (cfg.num_prompts,), generator=g)
    prompts = [torch.randint(3, args.vocab_size, (int(n),), generator=g).tolist() for n in lengths]
    with torch.device(cfg.device):
        model = Transformer(args).to(dtype).eval()
    hf = None
    if not cfg.skip_hf:
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            hf = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(cfg.device).eval()
    print(f"{cfg.device}: {args.arch} {model.num_params() / 1e6:.1f}M params {str(dtype)[6:]}, "
          f"threads={cfg.threads}, {cfg.num_prompts} prompts x K={cfg.num_samples} x "
          f"{cfg.max_new_tokens} new tokens, T={cfg.temperature}, top_p={cfg.top_p}, "
          f"compile={cfg.compile}", flush=True)
    cpu_rate, wall_rate = {}, {}
    print(f"  {'sampler':13s} {'tokens':>7s} {'CPU s':>7s} {'wall s':>7s} {'tok/CPU-s':>9s} "
          f"{'tok/wall-s':>10s}", flush=True)
    for label, fn in [("ours", ours_generate), ("transformers", hf_generate)]:
        if label == "transformers" and hf is None:
            continue
        target = model if label == "ours" else hf
        fn(target, prompts, cfg, 8)  # warm-up
        n, cpu, wall = timed(lambda: fn(target, prompts, cfg, cfg.max_new_tokens), cfg.device)
        cpu_rate[label], wall_rate[label] = n / cpu, n / wall
        print(f"  {label:13s} {n:7d} {cpu:7.2f} {wall:7.2f} {n / cpu:9.0f} {n / wall:10.0f}",
              flush=True)
    if len(cpu_rate) == 2:
        per_cpu = cpu_rate["ours"] / cpu_rate["transformers"]
        per_wall = wall_rate["ours"] / wall_rate["transformers"]
        print(f"  ratio ours / transformers = {per_cpu:.2f}x per CPU-second, "
              f"{per_wall:.2f}x per wall second", flush=True)
    if cfg.device == "cuda":
        batch1(model, hf, prompts[0], cfg)


if __name__ == "__main__":
    main()

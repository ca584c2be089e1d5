"""Sampler throughput with EOS on: dropping finished rows (compaction) vs lock-step vs transformers' generate().

    python bench/bench_eos.py                                      # CPU, a ~4M-param Llama, a few minutes
    python bench/bench_eos.py --threads 2 --repeats 2              # best of 2 runs per sampler
    python bench/bench_eos.py --device cuda                        # Qwen2.5-0.5B-shaped random model in bf16

Workload: 16 prompts x K=5 samples, max 256 new tokens, temperature 0.7, top-p 0.95, with a stop set whose summed
mean probability under the (random) model is 1 / (max_new_tokens / 8): sample lengths are about geometric with a
mean of 32 tokens and a long tail, as real answers are. The stop ids are picked by measuring each token's mean
next-token probability on sampled text, then taking random ids until their mass reaches the target.
Three samplers on the same weights and prompts, measured in one process:
  ours          generate(compact=True): finished rows leave the decode batch (sample.py, departure 2)
  lock-step     generate(compact=False): every row decodes until the batch's longest sample ends (the old way)
  transformers  AutoModelForCausalLM.generate with eos_token_id = the stop set (lock-step too, pads finished rows)
Useful tokens = each sample's tokens up to and including its stop id; tokens/s = useful tokens / wall time.
vLLM (continuous batching) is not installed here and not measured.
"""
import os
import sys
import tempfile
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_sample import bench_model, timed  # noqa: E402
from model import Transformer  # noqa: E402
from sample import cli, generate, left_pad  # noqa: E402


@dataclass
class Config:
    device: str = "cpu"           # cpu | cuda
    num_prompts: int = 16
    num_samples: int = 5          # K
    max_new_tokens: int = 256
    mean_frac: float = 8.0        # target mean sample length = max_new_tokens / mean_frac
    prompt_len: int = 32          # prompts get lengths in [prompt_len // 2, prompt_len]
    temperature: float = 0.7      # the paper's sampling settings
    top_p: float = 0.95
    threads: int = 1              # CPU threads for every sampler (the dev box is shared)
    repeats: int = 1              # timed runs per sampler; the best is reported
    skip_hf: bool = False


@torch.no_grad()
def pick_stop_ids(model, prompts, cfg):
    """Random token ids whose summed mean next-token probability (at the sampling temperature) is about
    1 / target mean length, measured on 64 sampled tokens of a few prompts."""
    outs = generate(model, None, prompts[:4], num_samples=2, max_new_tokens=64, temperature=cfg.temperature,
                    top_p=cfg.top_p, stop_ids=[])
    seqs = [p + s["tokens"] for p, o in zip(prompts, outs) for s in o]
    idx, mask = (t.to(model.lm_head.weight.device) for t in left_pad(seqs))
    probs = torch.softmax(model(idx, mask)[:, -64:] / cfg.temperature, -1)  # (B, 64, V)
    mean = probs.mean((0, 1)).cpu()  # (V,) mean next-token probability
    order = torch.randperm(len(mean), generator=torch.Generator().manual_seed(1))
    cum = mean[order].cumsum(0)
    k = int(torch.searchsorted(cum, cfg.mean_frac / cfg.max_new_tokens)) + 1
    return sorted(order[:k].tolist()), cum[k - 1].item()


def ours(model, prompts, cfg, stops, n_new, compact):
    outs = generate(model, None, prompts, num_samples=cfg.num_samples, max_new_tokens=n_new,
                    temperature=cfg.temperature, top_p=cfg.top_p, stop_ids=stops, batch_size=len(prompts),
                    compact=compact)
    return [len(s["tokens"]) + (s["finish_reason"] == "stop") for o in outs for s in o]  # useful tokens


def hf(model, prompts, cfg, stops, n_new):
    idx, mask = left_pad(prompts)
    with torch.no_grad():
        out = model.generate(idx.to(cfg.device), attention_mask=mask.to(cfg.device), max_new_tokens=n_new,
                             do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                             eos_token_id=stops, pad_token_id=0, num_return_sequences=cfg.num_samples)
    new = out[:, idx.shape[1]:].cpu()  # (N, L); finished rows are padded after their stop id
    hit = torch.isin(new, torch.tensor(stops))
    first = torch.where(hit.any(1), hit.int().argmax(1) + 1, new.shape[1])  # useful tokens incl. the stop
    return first.tolist()


def main():
    cfg = cli(Config)
    torch.set_num_threads(cfg.threads)
    from transformers import AutoModelForCausalLM

    args, dtype = bench_model(cfg.device)
    args.max_seq_len = max(args.max_seq_len, cfg.prompt_len + cfg.max_new_tokens)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, args.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(cfg.prompt_len // 2, cfg.prompt_len + 1, (cfg.num_prompts,), generator=g)]
    with torch.device(cfg.device):
        model = Transformer(args).to(dtype).eval()
    stops, mass = pick_stop_ids(model, prompts, cfg)
    samplers = [("ours", lambda n: ours(model, prompts, cfg, stops, n, True)),
                ("lock-step", lambda n: ours(model, prompts, cfg, stops, n, False))]
    if not cfg.skip_hf:
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            hf_model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(cfg.device).eval()
        samplers.append(("transformers", lambda n: hf(hf_model, prompts, cfg, stops, n)))
    print(f"{cfg.device}: {args.arch} {model.num_params() / 1e6:.1f}M params {str(dtype)[6:]}, threads={cfg.threads}, "
          f"{cfg.num_prompts} prompts x K={cfg.num_samples}, max {cfg.max_new_tokens} new tokens, T={cfg.temperature}, "
          f"top_p={cfg.top_p}; {len(stops)} stop ids with mean probability {mass:.4f} "
          f"(target mean length {cfg.max_new_tokens / cfg.mean_frac:.0f})")
    rate = {}
    print(f"  {'sampler':13s} {'useful tok':>10s} {'mean len':>8s} {'max len':>7s} {'hit max':>7s} {'seconds':>8s} "
          f"{'tokens/s':>9s}")
    for label, fn in samplers:
        fn(8)  # warm-up
        best = None
        for _ in range(cfg.repeats):
            lens, dt = timed(lambda: fn(cfg.max_new_tokens), cfg.device)
            if best is None or sum(lens) / dt > sum(best[0]) / best[1]:
                best = lens, dt
        lens, dt = best
        rate[label] = sum(lens) / dt
        capped = sum(n == cfg.max_new_tokens for n in lens) / len(lens)
        print(f"  {label:13s} {sum(lens):10d} {sum(lens) / len(lens):8.1f} {max(lens):7d} {capped:7.1%} {dt:8.2f} "
              f"{rate[label]:9.0f}")
    for other in ("lock-step", "transformers"):
        if other in rate:
            print(f"  ratio ours / {other} = {rate['ours'] / rate[other]:.2f}x")
    print("  vLLM: not installed here, not measured")


if __name__ == "__main__":
    main()

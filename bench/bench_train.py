"""bench/bench_train.py: one DNO training step (train.train_step) vs TRL's DPOTrainer with precomputed reference
log-probs, on the same model, the same pairs, the same effective batch; pairs/s and peak memory, printed as a ratio.

    /work/trlenv/bin/python bench/bench_train.py                       # CPU: a small random Llama (TRL in its venv)
    python bench/bench_train.py --device cuda                          # + MFU of a Qwen2.5-0.5B-shaped random model
    python bench/bench_train.py --impl dno                             # our step only (no TRL needed)

Each implementation runs in its own subprocess (so neither's imports or allocator state count against the other):
it loads the model, computes the reference log-probs once (untimed, as TRL's precompute_ref_log_probs does),
runs `warmup` optimizer steps, then times `steps` more; the fastest step over `repeats` alternating runs is
reported (the machine may be shared). Peak memory: CUDA max_memory_allocated over the timed
steps; on CPU the peak resident set size above what it was just before the timed steps (polled every 5 ms;
glibc's mmap threshold is pinned at 64 KB so that freed tensors leave the RSS and it tracks live memory).
What each side runs (same model weights, same pairs, batch 64 = 8 micro-batches of 8 pairs, AdamW, clip 1.0, beta =
eta = 0.1, activation checkpointing per block in both, float32 on CPU / bf16 autocast on CUDA):
    dno  train.train_step: pairs sorted by length into micro-batches; chosen and rejected in one right-padded forward;
         the vocab projection + log-softmax only at the response positions (model(idx, select, targets), fused
         backward), DNO-Prct loss = DPO's sigmoid loss with reference pi_t (dno.dno_loss).
    trl  DPOTrainer (sigmoid loss, precompute_ref_log_probs=True): chosen and rejected in one forward, its chunked
         fused LM head (on CPU it scores every position; it compacts to completion tokens only on Triton devices)
         and its per-step metrics (entropy, mean logits, top-1), shuffled batches.
MFU = (6 N + 12 L d T) FLOPs per real (non-pad) token (the PaLM count; N = parameters without the embedding table,
T = mean sequence length) per second, over the GPU's dense bf16 peak (--peak_tflops, H100 SXM: 989).
"""
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from cli import cli  # noqa: E402 (after the sys.path line)


@dataclass
class Config:
    device: str = "cpu"          # cpu | cuda
    impl: str = "both"           # both | dno | trl
    shape: str = ""              # small | medium | qwen0.5b; "" = small on CPU, qwen0.5b on CUDA
    pairs: int = 64              # effective batch (pairs per optimizer step), as the paper
    micro_batch: int = 8         # pairs per forward (gradient accumulation makes up the rest)
    prompt_len: int = 32         # prompt characters (= tokens: char-level tokenizer)
    min_resp: int = 32           # response lengths uniform in [min_resp, max_resp]
    max_resp: int = 96
    steps: int = 2               # timed optimizer steps
    grad_ckpt: bool = True       # activation checkpointing in both (TRL's default is on)
    warmup: int = 1              # untimed optimizer steps first
    repeats: int = 2             # runs per implementation, alternating; the best step of all is reported
    threads: int = 1             # CPU threads (more than the free cores: OpenMP spin-waits dominate)
    peak_tflops: float = 989.0   # dense bf16 peak of the GPU for MFU (H100 SXM)
    seed: int = 0
    workdir: str = ""            # model + pairs (internal: set by the parent process)


SHAPES = {  # transformers config fields. The text is char-level (ids < 102) but the vocab is a real tokenizer's:
    # the vocab projection's share of the FLOPs is what sets the cost of the log-probs (printed with the results)
    "small": dict(arch="llama", hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=32000),                 # Llama-2 / Mistral tokenizer size
    "medium": dict(arch="llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=32000),                # lm_head ~half the FLOPs (small: ~4/5)
    "qwen0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
}


def prepare(cfg, d):
    """A random model (HF layout, with the char tokenizer) and (warmup + steps) * pairs text pairs in d."""
    from tiny import hf_config, make_tokenizer
    import torch
    from transformers import AutoModelForCausalLM
    tok = make_tokenizer(os.path.join(d, "model"))
    shape = dict(SHAPES[cfg.shape])
    arch, vocab = shape.pop("arch"), shape.pop("vocab_size", len(tok))
    torch.manual_seed(cfg.seed)
    hf = AutoModelForCausalLM.from_config(hf_config(arch, vocab, max_position_embeddings=1024, **shape))
    hf.save_pretrained(os.path.join(d, "model"))
    rng, letters = random.Random(cfg.seed), "abcdefghijklmnopqrstuvwxyz     "
    text = lambda n: "".join(rng.choice(letters) for _ in range(n))
    with open(os.path.join(d, "pairs.jsonl"), "w") as f:
        for _ in range((cfg.warmup + cfg.steps) * cfg.pairs):
            f.write(json.dumps({"prompt": text(cfg.prompt_len), "chosen": text(rng.randint(cfg.min_resp, cfg.max_resp)),
                                "rejected": text(rng.randint(cfg.min_resp, cfg.max_resp))}) + "\n")


class PeakMemory:
    """Peak memory above the level at start(): CUDA allocator stats, or the CPU RSS polled by a thread."""
    def __init__(self, device):
        self.device, self.peak, self.stop = device, 0, False

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def start(self):
        import torch
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        self.base, self.peak = self.rss(), 0
        def poll():
            while not self.stop:
                self.peak = max(self.peak, self.rss() - self.base)
                time.sleep(0.005)
        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()

    def end_mb(self):
        import torch
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        self.stop = True
        self.thread.join()
        return max(self.peak, self.rss() - self.base) / 2**20


def flops_per_token(model_dir, mean_len):
    """PaLM count: 6 N + 12 L d T per token, N without the input embedding table (lm_head counted)."""
    c = json.load(open(os.path.join(model_dir, "config.json")))
    d, L, V, ffn = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
    hd = c.get("head_dim") or d // c["num_attention_heads"]
    attn = d * hd * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    n = L * (attn + 3 * d * ffn) + d * V
    return 6 * n + 12 * L * d * mean_len


def run_dno(cfg):
    """Our step: train.train_step on the pairs, reference log-probs computed once beforehand."""
    import torch
    from transformers import AutoTokenizer
    import dno
    import stages
    import train
    from model import Transformer
    device, mdir = torch.device(cfg.device), os.path.join(cfg.workdir, "model")
    tok = AutoTokenizer.from_pretrained(mdir)
    rows = train.read_jsonl(os.path.join(cfg.workdir, "pairs.jsonl"))
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    pairs = [{"prompt_tokens": ids(r["prompt"]), "chosen_tokens": ids(r["chosen"]) + [tok.eos_token_id],
              "rejected_tokens": ids(r["rejected"]) + [tok.eos_token_id], "r_chosen": 1.0, "r_rejected": 0.0}
             for r in rows]
    model = Transformer.from_pretrained(mdir, device=device)
    with torch.no_grad():                                       # pi_t's log-probs, once (train.py's reference stage)
        for k in range(0, len(pairs), cfg.micro_batch):
            chunk = pairs[k:k + cfg.micro_batch]
            seqs = [(p["prompt_tokens"], p[f"{s}_tokens"]) for s in ("chosen", "rejected") for p in chunk]
            logp = dno.batch_logps(model, seqs, device)[0].tolist()
            for j, p in enumerate(chunk):
                p["ref_chosen"], p["ref_rejected"] = logp[j], logp[j + len(chunk)]
    tcfg = SimpleNamespace(micro_batch=cfg.micro_batch, eta=0.1, grad_clip=1.0, grad_ckpt=cfg.grad_ckpt, target="hard")
    stages.for_training(model, cfg.grad_ckpt, bf16=device.type == "cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.0)
    times, tokens, mem = [], 0, PeakMemory(cfg.device)
    for step in range(cfg.warmup + cfg.steps):
        if step == cfg.warmup:
            mem.start()
        sync(cfg)
        t0 = time.perf_counter()
        acc = train.train_step(model, opt, pairs, list(range(step * cfg.pairs, (step + 1) * cfg.pairs)), tcfg, device)
        sync(cfg)
        if step >= cfg.warmup:
            times.append(time.perf_counter() - t0)
            tokens += int(acc[4])
    return times, tokens, mem.end_mb()


def run_trl(cfg):
    """TRL's DPOTrainer (sigmoid loss, beta 0.1, precompute_ref_log_probs=True) on the same pairs and batch."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    mdir = os.path.join(cfg.workdir, "model")
    tok = AutoTokenizer.from_pretrained(mdir)
    data = Dataset.from_list([json.loads(l) for l in open(os.path.join(cfg.workdir, "pairs.jsonl"))])
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32)
    mem, times, tokens, t0 = PeakMemory(cfg.device), [], [0], [0.0]

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == cfg.warmup:
                mem.start()
            sync(cfg)
            t0[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(cfg)
            if state.global_step > cfg.warmup:
                times.append(time.perf_counter() - t0[0])
    args = DPOConfig(output_dir=os.path.join(cfg.workdir, "trl"), per_device_train_batch_size=cfg.micro_batch,
                     gradient_accumulation_steps=cfg.pairs // cfg.micro_batch, max_steps=cfg.warmup + cfg.steps,
                     learning_rate=1e-6, lr_scheduler_type="constant", beta=0.1, precompute_ref_log_probs=True,
                     max_length=None, max_grad_norm=1.0, gradient_checkpointing=cfg.grad_ckpt,
                     bf16=cfg.device == "cuda", use_cpu=cfg.device == "cpu",
                     logging_steps=10**6, save_strategy="no", report_to=[], seed=cfg.seed, dataloader_drop_last=True,
                     remove_unused_columns=True, adam_beta2=0.95, weight_decay=0.0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[Clock()])
    ds = trainer.train_dataset                                 # tokens per step (dataset order; TRL shuffles)
    lens = [2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in ds]
    tokens[0] = int(sum(lens) * cfg.steps / (cfg.warmup + cfg.steps))
    trainer.train()
    return times, tokens[0], mem.end_mb()


def sync(cfg):
    if cfg.device == "cuda":
        import torch
        torch.cuda.synchronize()


def child(cfg):
    import torch
    torch.set_num_threads(cfg.threads)
    times, tokens, mb = (run_dno if cfg.impl == "dno" else run_trl)(cfg)
    best = min(times)                                           # the least disturbed step (shared machines)
    print(json.dumps({"impl": cfg.impl, "step_s": best, "mean_step_s": sum(times) / len(times),
                      "pairs_per_s": cfg.pairs / best, "tokens_per_s": tokens / len(times) / best, "peak_mb": mb}))


def main():
    cfg = cli(Config)
    cfg.shape = cfg.shape or ("qwen0.5b" if cfg.device == "cuda" else "small")
    if cfg.workdir:                                             # we are a child: run one implementation
        return child(cfg)
    impls = ["dno", "trl"] if cfg.impl == "both" else [cfg.impl]
    if "trl" in impls:
        try:
            import trl  # noqa: F401
        except ImportError:
            sys.exit("error: trl is not importable with this python; install it in a separate venv:\n"
                     "  python3 -m venv --system-site-packages /work/trlenv && /work/trlenv/bin/pip install trl\n"
                     "  /work/trlenv/bin/python bench/bench_train.py   (or --impl dno for our step alone)")
    print("config: " + json.dumps(asdict(cfg)))
    res = {}
    with tempfile.TemporaryDirectory() as d:
        prepare(cfg, d)
        c = json.load(open(os.path.join(d, "model", "config.json")))
        head = c["hidden_size"] * c["vocab_size"]
        print(f"model: {c['model_type']} d={c['hidden_size']} L={c['num_hidden_layers']} ffn={c['intermediate_size']} "
              f"V={c['vocab_size']}; lm_head = {100 * 6 * head / flops_per_token(os.path.join(d, 'model'), 0):.0f}% "
              f"of the matmul FLOPs per token")
        print("dno: train.train_step: length-sorted micro-batches, chosen+rejected in one forward, vocab projection "
              "and log-softmax only at response positions (fused)\n"
              "trl: DPOTrainer(precompute_ref_log_probs): chosen+rejected in one forward, chunked fused LM head over "
              "every position on CPU (completion positions only on Triton GPUs), entropy/top-1 metrics")
        for impl in impls * cfg.repeats:                        # alternate, keep each one's best run
            argv = [f"--{k}={v}" for k, v in {**asdict(cfg), "impl": impl, "workdir": d}.items()]
            p = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True,
                               env=dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS=str(cfg.threads),
                                        MALLOC_MMAP_THRESHOLD_="65536"))  # RSS follows live tensors
            lines = [l for l in p.stdout.splitlines() if l.startswith('{"impl"')]
            if p.returncode or not lines:
                sys.exit(f"error: {impl} run failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else '?'}")
            r = json.loads(lines[-1])
            res[impl] = r if impl not in res or r["step_s"] < res[impl]["step_s"] else res[impl]
        fpt = flops_per_token(os.path.join(d, "model"), (2 * cfg.prompt_len + cfg.min_resp + cfg.max_resp) / 2)
    print(f"{'impl':5} | {'s/step':>8} | {'mean s':>8} | {'pairs/s':>8} | {'tok/s':>9} | {'peak MB':>8}" +
          (" |   MFU" if cfg.device == "cuda" else ""))
    for impl, r in res.items():
        mfu = f" | {100 * r['tokens_per_s'] * fpt / (cfg.peak_tflops * 1e12):4.1f}%" if cfg.device == "cuda" else ""
        print(f"{impl:5} | {r['step_s']:8.3f} | {r['mean_step_s']:8.3f} | {r['pairs_per_s']:8.2f} | "
              f"{r['tokens_per_s']:9.0f} | "
              f"{r['peak_mb']:8.1f}{mfu}")
    if len(res) == 2:
        print(f"dno / trl: {res['dno']['pairs_per_s'] / res['trl']['pairs_per_s']:.2f}x pairs/s, "
              f"{res['dno']['peak_mb'] / max(res['trl']['peak_mb'], 1e-9):.2f}x peak memory "
              f"(target >= 1.5x at <= 1.0x)")


if __name__ == "__main__":
    main()

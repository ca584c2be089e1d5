"""bench/bench_train.py: one DNO training step (iteration.train_step) vs TRL's DPOTrainer with
precomputed reference log-probs, on the same model, the same pairs, the same effective batch; pairs
per CPU-second and per wall second, and peak memory, printed as ratios.

    nice -n 10 env OMP_NUM_THREADS=1 python bench/bench_train.py  # CPU: small random Llama, minutes
    python bench/bench_train.py --impl dno                  # our step only (TRL not needed)
    python bench/bench_train.py --device cuda               # + MFU: Qwen2.5-0.5B-shaped model

TRL's side runs when `trl` is importable with this python (pip install trl, best in its own venv);
else it prints one line and is skipped. Each implementation runs in its own subprocess (neither's
imports or allocator state count against the other): it loads the model, computes the reference
log-probs once (untimed, as TRL's precompute_ref_log_probs does), runs `warmup` optimizer steps,
then times `steps` more, in CPU seconds (time.process_time, all threads) and wall seconds; the best
step over `repeats` alternating runs is reported (the machine may be shared). Peak memory is
measured in a separate, untimed subprocess per implementation: CUDA max_memory_allocated over its
step after warmup; on CPU the peak resident set size above the level before it (polled every 5 ms),
with glibc's mmap threshold pinned at 64 KB in that process only, so that freed tensors leave the
RSS (this costs kernel time, so the timed runs keep the normal allocator).
What each side runs (same model weights, same pairs, `pairs` per step in micro-batches of
`micro_batch`, AdamW, clip 1.0, beta = eta = 0.1, activation checkpointing per block in both,
float32 on CPU / bf16 autocast on CUDA). The paper's batch is 64 pairs (--pairs 64); the default is
smaller so that a run takes minutes.
    dno  iteration.train_step: pairs sorted by length into micro-batches; chosen and rejected in
         one right-padded forward; the vocab projection + log-softmax only at the response positions
         (model(idx, select, targets), fused backward); DNO-Prct loss = DPO's sigmoid loss with
         reference pi_t.
    trl  DPOTrainer (sigmoid loss, precompute_ref_log_probs=True): chosen and rejected in one
         forward, its chunked fused LM head (on CPU it scores every position; it compacts to
         completion tokens only on Triton devices) and its per-step metrics (entropy, mean logits,
         top-1), shuffled.
MFU = (6 N + 12 L d T) FLOPs per real (non-pad) token (the PaLM count; N = parameters without the
embedding table, T = mean sequence length) per wall second, over the GPU's dense bf16 peak
(--peak_tflops, H100 SXM: 989).
"""
import importlib.util
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
from dnolib.cli import cli  # noqa: E402 (after the sys.path line)


@dataclass
class Config:
    device: str = "cpu"          # cpu | cuda
    impl: str = "both"           # both | dno | trl (both: trl's side skipped if trl is missing)
    shape: str = ""              # small | medium | qwen0.5b; "" = small on CPU, qwen0.5b on CUDA
    pairs: int = 16              # effective batch (pairs per optimizer step); the paper's is 64
    micro_batch: int = 8         # pairs per forward (gradient accumulation makes up the rest)
    prompt_len: int = 32         # prompt characters (= tokens: char-level tokenizer)
    min_resp: int = 32           # response lengths uniform in [min_resp, max_resp]
    max_resp: int = 96
    steps: int = 2               # timed optimizer steps
    grad_ckpt: bool = True       # activation checkpointing in both (TRL's default is on)
    warmup: int = 1              # untimed optimizer steps first
    repeats: int = 1             # timed runs per implementation, alternating; the best step counts
    memory: bool = True          # one more, untimed run per implementation: its peak memory
    threads: int = 1             # CPU threads (more than the free cores: OpenMP spin-waits)
    peak_tflops: float = 989.0   # dense bf16 peak of the GPU for MFU (H100 SXM)
    seed: int = 0
    workdir: str = ""            # model + pairs (internal: set by the parent process)
    measure: str = "time"        # time | memory: what a child process measures (internal)


# transformers config fields. The text is char-level (ids < 102) but the vocab is a real
# tokenizer's: the vocab projection's share of the FLOPs sets the cost of the log-probs (printed)
SHAPES = {
    "small": dict(arch="llama", hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=32000),  # Llama-2 vocab
    "medium": dict(arch="llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=4, vocab_size=32000),  # head: ~1/2
    "qwen0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
}


def prepare(cfg, d):
    """A random model (HF layout, char tokenizer) and (warmup + steps) * pairs pairs in d."""
    from tiny import hf_config, make_tokenizer
    import torch
    from transformers import AutoModelForCausalLM
    tok = make_tokenizer(os.path.join(d, "model"))
    shape = dict(SHAPES[cfg.shape])
    arch, vocab = shape.pop("arch"), shape.pop("vocab_size", len(tok))
    torch.manual_seed(cfg.seed)
    hf_cfg = hf_config(arch, vocab, max_position_embeddings=1024, **shape)
    hf = AutoModelForCausalLM.from_config(hf_cfg)
    hf.save_pretrained(os.path.join(d, "model"))
    rng, letters = random.Random(cfg.seed), "abcdefghijklmnopqrstuvwxyz     "
    text = lambda n: "".join(rng.choice(letters) for _ in range(n))
    with open(os.path.join(d, "pairs.jsonl"), "w") as f:
        for _ in range((cfg.warmup + cfg.steps) * cfg.pairs):
            prompt = text(cfg.prompt_len)
            chosen = text(rng.randint(cfg.min_resp, cfg.max_resp))
            rejected = text(rng.randint(cfg.min_resp, cfg.max_resp))
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")


class PeakMemory:
    """Peak memory above the level at start(): CUDA allocator stats, or CPU RSS polled by a thread.
    Does nothing unless enabled (the timed runs do not poll)."""
    def __init__(self, device, enabled):
        self.device, self.enabled, self.peak, self.stop = device, enabled, 0, False

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def start(self):
        import torch
        if not self.enabled:
            return
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
        if not self.enabled:
            return None
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        self.stop = True
        self.thread.join()
        return max(self.peak, self.rss() - self.base) / 2**20


class Clock:
    """Wall and CPU seconds of each step after warmup: [(wall, cpu)]."""
    def __init__(self, cfg):
        self.cfg, self.times = cfg, []

    def begin(self):
        sync(self.cfg)
        self.t = (time.perf_counter(), time.process_time())

    def end(self, step):
        sync(self.cfg)
        if step >= self.cfg.warmup:
            self.times.append((time.perf_counter() - self.t[0], time.process_time() - self.t[1]))


def flops_per_token(model_dir, mean_len):
    """PaLM count: 6 N + 12 L d T per token, N without the input embedding table (lm_head in)."""
    c = json.load(open(os.path.join(model_dir, "config.json")))
    d, L, V, ffn = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
    hd = c.get("head_dim") or d // c["num_attention_heads"]
    attn = d * hd * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    n = L * (attn + 3 * d * ffn) + d * V
    return 6 * n + 12 * L * d * mean_len


def run_dno(cfg):
    """Our step: iteration.train_step on the pairs, reference log-probs computed once beforehand."""
    import torch
    from transformers import AutoTokenizer
    import dno
    from dnolib.distributed import for_training
    from dnolib.model import Transformer
    from iteration import train_step
    from dnolib.stages import read_jsonl
    device, mdir = torch.device(cfg.device), os.path.join(cfg.workdir, "model")
    tok = AutoTokenizer.from_pretrained(mdir)
    rows = read_jsonl(os.path.join(cfg.workdir, "pairs.jsonl"))
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    eos = [tok.eos_token_id]
    pairs = [{"prompt_tokens": ids(r["prompt"]), "chosen_tokens": ids(r["chosen"]) + eos,
              "rejected_tokens": ids(r["rejected"]) + eos, "r_chosen": 1.0, "r_rejected": 0.0}
             for r in rows]
    amp = torch.bfloat16 if device.type == "cuda" else False
    model = Transformer.from_pretrained(mdir, device=device)
    with torch.no_grad():                           # pi_t's log-probs, once (the reference stage)
        for k in range(0, len(pairs), cfg.micro_batch):
            chunk = pairs[k:k + cfg.micro_batch]
            sides = ("chosen", "rejected")
            seqs = [(p["prompt_tokens"], p[f"{s}_tokens"]) for s in sides for p in chunk]
            logp = dno.batch_logps(model, seqs, device, amp)[0].tolist()
            for j, p in enumerate(chunk):
                p["ref_chosen"], p["ref_rejected"] = logp[j], logp[j + len(chunk)]
    tcfg = SimpleNamespace(micro_batch=cfg.micro_batch, eta=0.1, grad_clip=1.0, target="hard")
    for_training(model, cfg.grad_ckpt, bf16=amp is torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.0)
    clock, tokens, mem = Clock(cfg), 0, PeakMemory(cfg.device, cfg.measure == "memory")
    for step in range(cfg.warmup + cfg.steps):
        if step == cfg.warmup:
            mem.start()
        clock.begin()
        batch = list(range(step * cfg.pairs, (step + 1) * cfg.pairs))
        acc = train_step(model, opt, pairs, batch, tcfg, device, amp)
        clock.end(step)
        if step >= cfg.warmup:
            tokens += int(acc[4])
    return clock.times, tokens, mem.end_mb()


def run_trl(cfg):
    """TRL's DPOTrainer (sigmoid loss, beta 0.1, precompute_ref_log_probs=True), same pairs."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    mdir = os.path.join(cfg.workdir, "model")
    tok = AutoTokenizer.from_pretrained(mdir)
    with open(os.path.join(cfg.workdir, "pairs.jsonl")) as f:
        data = Dataset.from_list([json.loads(line) for line in f])
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32)
    clock, mem = Clock(cfg), PeakMemory(cfg.device, cfg.measure == "memory")

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == cfg.warmup:
                mem.start()
            clock.begin()

        def on_step_end(self, args, state, control, **kw):
            clock.end(state.global_step - 1)              # global_step is already incremented
    args = DPOConfig(output_dir=os.path.join(cfg.workdir, "trl"),
                     per_device_train_batch_size=cfg.micro_batch,
                     gradient_accumulation_steps=cfg.pairs // cfg.micro_batch,
                     max_steps=cfg.warmup + cfg.steps, learning_rate=1e-6,
                     lr_scheduler_type="constant", beta=0.1, precompute_ref_log_probs=True,
                     max_length=None, max_grad_norm=1.0, gradient_checkpointing=cfg.grad_ckpt,
                     bf16=cfg.device == "cuda", use_cpu=cfg.device == "cpu", logging_steps=10**6,
                     save_strategy="no", report_to=[], seed=cfg.seed, dataloader_drop_last=True,
                     remove_unused_columns=True, adam_beta2=0.95, weight_decay=0.0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         callbacks=[Timer()])
    ds = trainer.train_dataset                      # tokens per step (dataset order; TRL shuffles)
    lens = [2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in ds]
    tokens = int(sum(lens) * cfg.steps / (cfg.warmup + cfg.steps))
    trainer.train()
    return clock.times, tokens, mem.end_mb()


def sync(cfg):
    if cfg.device == "cuda":
        import torch
        torch.cuda.synchronize()


def child(cfg):
    import torch
    torch.set_num_threads(cfg.threads)
    times, tokens, mb = (run_dno if cfg.impl == "dno" else run_trl)(cfg)
    wall = min(t[0] for t in times)                 # the least disturbed step (shared machines)
    cpu = min(t[1] for t in times)
    print(json.dumps({"impl": cfg.impl, "step_s": wall, "cpu_s": cpu, "tokens": tokens / len(times),
                      "peak_mb": mb}))


def spawn(cfg, d, impl, measure):
    """One child run of impl -> its JSON line as a dict; a memory pass pins the mmap threshold."""
    over = {"impl": impl, "workdir": d, "measure": measure}
    if measure == "memory":
        over["steps"] = 1
    argv = [f"--{k}={v}" for k, v in {**asdict(cfg), **over}.items()]
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS=str(cfg.threads))
    env.pop("MALLOC_MMAP_THRESHOLD_", None)         # the timed runs use the normal allocator
    if measure == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"     # freed tensors leave the RSS: it tracks use
    p = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env)
    lines = [l for l in p.stdout.splitlines() if l.startswith('{"impl"')]
    if p.returncode or not lines:
        err = p.stderr.strip().splitlines()
        sys.exit(f"error: {impl} {measure} run failed: {err[-1] if err else '?'}")
    return json.loads(lines[-1])


def main():
    cfg = cli(Config)
    cfg.shape = cfg.shape or ("qwen0.5b" if cfg.device == "cuda" else "small")
    if cfg.workdir:                                 # we are a child: run one implementation
        return child(cfg)
    if cfg.impl not in ("both", "dno", "trl") or cfg.shape not in SHAPES:
        sys.exit(f"error: --impl must be both, dno or trl and --shape one of {', '.join(SHAPES)}")
    if cfg.pairs % cfg.micro_batch or cfg.steps < 1 or cfg.warmup < 1 or cfg.repeats < 1:
        sys.exit("error: --pairs must be a multiple of --micro_batch; --steps, --warmup, --repeats "
                 "must be >= 1")
    impls = ["dno", "trl"] if cfg.impl == "both" else [cfg.impl]
    if "trl" in impls and importlib.util.find_spec("trl") is None:
        missing = "trl is not importable with this python (pip install trl, best in its own venv)"
        if cfg.impl == "trl":
            sys.exit(f"error: {missing}")
        print(f"{missing}: its side is skipped", flush=True)
        impls = ["dno"]
    print("config: " + json.dumps(asdict(cfg)), flush=True)
    res = {}
    with tempfile.TemporaryDirectory() as d:
        prepare(cfg, d)
        c = json.load(open(os.path.join(d, "model", "config.json")))
        head = c["hidden_size"] * c["vocab_size"]
        head_share = 6 * head / flops_per_token(os.path.join(d, "model"), 0)
        print(f"model: {c['model_type']} d={c['hidden_size']} L={c['num_hidden_layers']} "
              f"ffn={c['intermediate_size']} V={c['vocab_size']}; "
              f"lm_head = {head_share:.0%} of the matmul FLOPs per token")
        print("dno: iteration.train_step: length-sorted micro-batches, chosen+rejected in one "
              "forward, vocab projection and log-softmax only at response positions (fused)\n"
              "trl: DPOTrainer(precompute_ref_log_probs): chosen+rejected in one forward, chunked "
              "fused LM head over every position on CPU (completion positions only on Triton "
              "GPUs), entropy/top-1 metrics", flush=True)
        for impl in impls * cfg.repeats:            # alternate, keep each one's best step
            r = spawn(cfg, d, impl, "time")
            if impl in res:
                r = {k: min(r[k], res[impl][k]) if k in ("step_s", "cpu_s") else r[k] for k in r}
            res[impl] = r
            print(f"  {impl} timed run: best step {r['step_s']:.2f} s wall, {r['cpu_s']:.2f} CPU s",
                  flush=True)
        for impl in impls if cfg.memory else []:
            res[impl]["peak_mb"] = spawn(cfg, d, impl, "memory")["peak_mb"]
        mean_len = (2 * cfg.prompt_len + cfg.min_resp + cfg.max_resp) / 2
        fpt = flops_per_token(os.path.join(d, "model"), mean_len)
    mfu_head = " |   MFU" if cfg.device == "cuda" else ""
    print(f"{'impl':5} | {'wall s/step':>11} | {'CPU s/step':>10} | {'pairs/wall-s':>12} | "
          f"{'pairs/CPU-s':>11} | {'tok/wall-s':>10} | {'peak MB':>8}{mfu_head}")
    for impl, r in res.items():
        mfu = ""
        if cfg.device == "cuda":
            mfu = f" | {100 * r['tokens'] / r['step_s'] * fpt / (cfg.peak_tflops * 1e12):4.1f}%"
        mb = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        print(f"{impl:5} | {r['step_s']:11.3f} | {r['cpu_s']:10.3f} | "
              f"{cfg.pairs / r['step_s']:12.2f} | "
              f"{cfg.pairs / r['cpu_s']:11.2f} | {r['tokens'] / r['step_s']:10.0f} | {mb:>8}{mfu}")
    if len(res) == 2:
        dno_r, trl_r = res["dno"], res["trl"]
        line = (f"dno / trl: {trl_r['cpu_s'] / dno_r['cpu_s']:.2f}x pairs per CPU-second, "
                f"{trl_r['step_s'] / dno_r['step_s']:.2f}x pairs per wall second")
        if cfg.memory:
            line += f", {dno_r['peak_mb'] / max(trl_r['peak_mb'], 1e-9):.2f}x peak memory"
        print(line + " (target >= 1.5x at <= 1.0x memory)")


if __name__ == "__main__":
    main()

"""train.py: Direct Nash Optimization (Rosset et al. 2024), Algorithm 2 (DNO-Prct) as a program;
--target soft trains Algorithm 1's regression target instead. The loop is `dno_prct`, one line per
algorithm line (docs/paper.md maps every line of the paper's algorithms to the code).

    python train.py                         # CPU demo: built-in task, model, judge (~1 min)
    python train.py --out runs/x --model Qwen/Qwen2.5-0.5B-Instruct --prompts p.jsonl \
        --judge rubric --judge_model gpt-4o-mini --max_usd 20    # one GPU, an API judge
    torchrun --nproc_per_node=8 train.py --out runs/x --model DIR --prompts p.jsonl --judge rubric
    python train.py ... --sampler vllm --vllm_python VENV/bin/python   # line 4 by vLLM, its own venv
    python train.py ... --report_to tensorboard   # or wandb: config, steps, metrics (docs/one_gpu.md)
    python train.py --out runs/x --iterations 4   # grow a finished run: iterations 1..3 are reused
    python train.py --out runs/x --rollback 2     # redo iteration 2 and later
    python evaluate.py --out runs/x               # the report of a run
    python evaluate.py --out runs/x --alpaca_eval alpaca_eval.json   # AlpacaEval 2's model_outputs

Prompts JSONL lines: {"prompt": text | [{"role", "content"}, ...], "gold"?: teacher response,
"id"?: str}. --out holds iter_0/eval/ (pi_1 on validation), iter_t/{samples, judgments, pairs,
reference, checkpoint, eval}/ for t = 1..T (checkpoint/ is pi_{t+1} in the HF layout),
judge_cache.jsonl, judge_ledger.json (the run's judge budget), judge_refused.json (parameters the
judge server refused), metrics.jsonl, best.json and metrics.png. Each stage folder is atomic and records what it read and the flags that shaped it
(iteration.STAGES declares both): a rerun resumes, reusing a stage only when they match (stages.py).
--judge: rubric | pairwise | local (oracle.py), a Python judge module:function or its alias
(judging.ALIASES). Under torchrun, FSDP2 on nccl (GPU) or gloo (CPU): ranks split sampling and
reference log-probs; rank 0 judges and writes (OUT must be shared; distributed.py).

Departures from the paper (numbered):
    1. Prompts whose tokens + max_new_tokens exceed the model's context are skipped and counted.
    2. --target soft trains Alg. 1's regression target sigmoid(r_t(y+) - r_t(y-)) on the same
       pipeline (mu_1 = mu_2 = pi_t plus the gold); --target hard (default) is Alg. 2, line 7.
       --opponents samples: r_t(y) is the win-rate against pi_t's K samples only (Alg. 1, line 3:
       E_{y' ~ pi_t} P(y > y')); the gold stays a candidate, never an opponent. It is one r_t for
       both targets and for --pairs margin with a win-rate judge; a rubric judge's margin rule
       reads absolute scores, which have no opponents.
    3. The best iterate (line 9) is chosen on held-out prompts judged by the training oracle in both
       orders (the paper: AlpacaEval 2 / MT-Bench), by --select_by (default: length-controlled
       win-rate vs gold).
    4. A judged stage with more failures than --max_failure_rate is not committed: the run stops,
       the answers so far stay cached, a rerun re-asks only the failures. No surviving pairs stops
       the run too.
    5. The slices D_t have a size that does not depend on T (see `split`), so a run can grow; a run
       that outgrows its prompts takes another pass over them, reshuffled (the paper: fresh prompts
       every iteration).
    6. --lr defaults to 4e-5, not the paper's 5E-5 (which it states for a 7B model): a value sized
       for the built-in demo; pass --lr 5e-5 for the paper's.
"""
from dnolib.cli import early_help
if __name__ == "__main__":
    early_help(__file__)                                # --help before torch loads: under a second

import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

import oracle
from dnolib import stages, tracking, vllm_sampler
from dnolib.cli import check, cli, show
from dnolib.distributed import barrier, on_rank0, print0, rank, world
from dnolib.distributed import finish as finish_processes
from dnolib.distributed import setup as setup_device
from iteration import (Run, eval_step, judge_step, pairs_step, reference_step, sample_step,
                       train_pi)
from sample import encode_prompt
from dnolib.model import ModelArgs
from dnolib.budget import check_memory, pick_threads
from dnolib.model_io import check_vocab, load_tokenizer, read_config, resolve_model
from dnolib.prompts import read_prompts


@dataclass
class Config:
    out: str = "out"              # run folder
    model: str = ""               # pi_1: a HF folder or model id; "" = the demo model (OUT/demo)
    prompts: str = ""             # prompts JSONL; "" = the built-in demo prompts
    judge: str = "demo"           # rubric|pairwise|local, module:function or a judging.ALIASES name
    iterations: int = 3           # T; raise it on a finished run to grow it (1..T are reused)
    prompts_per_iter: int = 0     # |D_t|; 0 = the size of this run's D_1, on a fresh run pool // T
    num_val: int = 200            # held-out validation prompts (line 9 chooses the best iterate)
    num_samples: int = 5          # K responses per prompt from pi_t (line 4; the paper: 5)
    sample_rows: int = 0          # (prompt, sample) rows the sampler decodes at once; 0: what fits
    max_new_tokens: int = 32      # response length cap (the demo needs 14; raise it for real tasks)
    temperature: float = 0.7      # sampling temperature (the paper: 0.7)
    top_p: float = 0.95           # nucleus sampling (the paper: 0.95)
    eval_temperature: float = 0.0  # temperature of the one validation answer per prompt (0: greedy)
    target: str = "hard"          # hard: Alg. 2, line 7 | soft: Alg. 1's sigmoid(r(y+) - r(y-))
    pairs: str = "margin"         # margin (line 6) | all | restrictive | spin: dno.py's pair rules
    gold: bool = True             # the gold joins the K samples as a candidate (Alg. 1: off-policy mu)
    opponents: str = "candidates"  # r_t(y) a win-rate vs: candidates (K+1) | samples (pi_t's K)
    ref_mix: float = 0.0          # extension 1: log ref = (1-ref_mix) log pi_t + ref_mix log pi_1
    optimistic: int = 0           # extension 2: OMWU, ref = the last N iterates, halving (0: off)
    teacher_styles: str = ""      # built-in demo: the teacher's style mix, e.g. 0.8,0.15,0.05
    eta: float = 0.1              # eta of the contrastive loss (line 7; DPO's beta); see dno.py
    lr: float = 4e-5              # peak lr of iteration 1 (demo-sized; the paper: 5e-5 for 7B)
    lr_decay: float = 1.0         # lr_t = lr * lr_decay**(t-1) (1 = one lr; iteration.py's schedule)
    warmup: float = 0.1           # fraction of the steps with linear warmup
    schedule: str = "cosine"      # cosine | linear decay after warmup
    batch_size: int = 64          # global batch of pairs per optimizer step (the paper: 64)
    micro_batch: int = 8          # pairs per forward pass per rank (accumulated up to batch_size)
    epochs: float = 1.0           # passes over the pairs per iteration (the paper: <= 1)
    max_steps: int = 0            # stop after this many optimizer steps (0 = no cap)
    lora_rank: int = 0            # rank-r adapters on the projections (lora.py), merged on save
    lora_alpha: float = 16.0      # adapter scale alpha / lora_rank
    grad_ckpt: bool = False       # activation checkpointing per block: far less memory
    precision: str = "auto"       # auto (GPU: bf16, CPU: fp32) | bf16 | fp32: training, log-probs
    weight_decay: float = 0.0     # AdamW weight decay
    grad_clip: float = 1.0        # gradient norm clip
    replay: float = 0.3           # share of pairs replayed from t-1, halving further back
    select_by: str = "lc_vs_gold"  # best iterate by lc_vs_gold | vs_gold | lc_vs_init | vs_init
    seed: int = 0                 # seed of splits, sampling, replay, shuffling and batch order
    device: str = "auto"          # auto | cpu | cuda
    threads: str = "auto"         # CPU threads: auto = what the model size warrants | N
    base_url: str = ""            # judge endpoint (OpenAI-compatible); "" = oracle's default
    judge_model: str = ""         # judge model (required; --judge local: its folder or hub id)
    prices: str = ""              # judge prices, $ per 1M tokens: model=in,out | JSON | a JSON file
    judge_wait: float = 0.0       # seconds to wait for a judge server still starting (0: none)
    judge_params: str = ""        # JSON merged into each judge request, e.g. '{"seed": 1}'
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the env var holding the judge's API key
    concurrency: int = 8          # judge requests in flight
    max_usd: float = 0.0          # judge budget in dollars, whole run, across resumes (0: none)
    max_calls: int = 0            # judge budget in requests, whole run, across resumes (0: none)
    max_failure_rate: float = 0.1  # a judged stage failing more than this is not committed (dep. 7)
    position_audit: float = 0.1   # share of training prompts judged again in reversed order
    judge_context: int = 128000   # the judge model's context (tokens): candidates are cut to fit it
    rollback: int = -1            # redo iteration t and later: discard OUT/iter_t.. (-1: keep all)
    stage_pause: float = 0.0      # test hook: seconds to sleep inside each stage before it commits
    # engines and logging: vLLM for line 4 and validation answers, experiment tracking
    sampler: str = "ours"         # who samples line 4 and the validation answers: ours | vllm
    vllm_python: str = ""         # --sampler vllm: the python of your own vLLM environment
    vllm_memory: float = 0.5      # --sampler vllm: share of the GPU its engine may take
    vllm_parity: int = 8          # --sampler vllm: prompts our model checks against vLLM (0: none)
    report_to: str = "none"       # none | tensorboard | wandb: config, train steps, metrics.jsonl


CHOICES = {"target": ("hard", "soft"), "pairs": ("margin", "all", "restrictive", "spin"),
           "schedule": ("cosine", "linear"),
           "opponents": ("candidates", "samples"), "sampler": ("ours", "vllm"),
           "report_to": ("none", "tensorboard", "wandb"),
           "select_by": ("lc_vs_gold", "vs_gold", "lc_vs_init", "vs_init"),
           "device": ("auto", "cpu", "cuda"), "precision": ("auto", "bf16", "fp32")}
PRECISION = {"bf16": torch.bfloat16, "fp32": False}    # --precision -> autocast dtype of training
inf, tiny = float("inf"), 1e-300
GE0, GE1, UNIT = (0, inf, ">= 0"), (1, inf, ">= 1"), (0, 1, "in [0, 1]")
POS = (tiny, inf, "finite and > 0")
LIMITS = {  # flag: (lowest, highest, in words), checked by cli.check with CHOICES before any work
    "iterations": GE1, "num_val": GE1, "prompts_per_iter": GE0, "num_samples": GE1,
    "max_new_tokens": GE1, "temperature": (0, inf, "finite and >= 0"),
    "eval_temperature": (0, inf, "finite and >= 0"), "top_p": (tiny, 1, "in (0, 1]"), "eta": POS,
    "lr": POS, "lr_decay": POS, "warmup": (0, 1 - 1e-9, "in [0, 1)"), "batch_size": GE1,
    "micro_batch": GE1, "epochs": POS, "max_steps": GE0, "weight_decay": GE0, "grad_clip": POS,
    "replay": (0, 0.5 - 1e-12, "in [0, 0.5): 0.3 + 0.15 + ... must stay below 1"),
    "concurrency": GE1, "max_usd": GE0, "max_calls": GE0, "max_failure_rate": UNIT, "judge_wait": GE0,
    "position_audit": UNIT, "judge_context": (256, inf, ">= 256"), "rollback": (-1, inf, ">= -1"),
    "stage_pause": GE0, "sample_rows": GE0, "lora_rank": GE0, "lora_alpha": POS,
    "ref_mix": UNIT, "optimistic": GE0, "vllm_memory": (tiny, 1, "in (0, 1]"), "vllm_parity": GE0}
# Every field is a flag some stage records (iteration.STAGES), a file read by content through the
# stage input that hashes it (INPUT_FIELDS), or a field that changes no stage's files (NO_ARTIFACT;
# device: what it changes, the resolved --precision records). tests/test_declared.py checks it.
INPUT_FIELDS = {"model": "policy", "prompts": "prompts", "teacher_styles": "policy"}   # demo: pi_1
NO_ARTIFACT = ("out", "iterations", "device", "threads", "grad_ckpt", "select_by",
               "sample_rows", "api_key_env", "prices", "judge_wait", "concurrency", "max_usd",
               "max_calls", "max_failure_rate", "rollback", "stage_pause", "vllm_python",
               "vllm_memory", "vllm_parity", "report_to")


# ----------------------------------------------------------------------------- prompts
def load_prompts(path, tok, max_prompt_tokens):
    """Prompts JSONL (dnolib.prompts.read_prompts) -> ([{"id": str, "prompt", "gold", "prompt_tokens"}],
    n_skipped). Checks the optional gold response (a string) and unique ids; prompts longer than
    max_prompt_tokens are skipped and counted (departure 1)."""
    rows, skipped, seen = [], 0, set()
    for r in read_prompts(path):
        where, rid = f"{path}:{r['line']}", str(r["id"])
        if not (r.get("gold") is None or isinstance(r["gold"], str)):
            raise ValueError(f"{where}: 'gold' must be a string")
        if rid in seen:
            raise ValueError(f"{where}: duplicate id {rid!r}")
        seen.add(rid)
        ids = encode_prompt(tok, r["prompt"])
        if len(ids) > max_prompt_tokens:                        # departure 1
            skipped += 1
            continue
        gold = r.get("gold") or None
        rows.append({"id": rid, "prompt": r["prompt"], "gold": gold, "prompt_tokens": ids})
    return rows, skipped


def slice_size(cfg, pool):
    """|D_t|: --prompts_per_iter; if 0, the size this run's D_1 recorded (so a grown run keeps its
    slices), and on a fresh run the pool of training prompts split evenly over T."""
    if cfg.prompts_per_iter:
        return cfg.prompts_per_iter
    manifest = stages.stage_dir(cfg.out, 1, "samples", "manifest.json")
    if os.path.exists(manifest):
        flags = stages.read_json(manifest).get("shape", {}).get("flags", {})
        recorded = flags.get("prompts_per_iter")
        if isinstance(recorded, int) and recorded > 0:
            return recorded
    return pool // cfg.iterations


def split(rows, cfg):
    """Validation and D_1..D_T (departure 5). One seeded permutation of the usable prompts: its
    first --num_val are the validation set, the rest (the pool) is cut in order into slices of
    --prompts_per_iter. Slice t never depends on T, so --iterations can be raised on a finished run.
    Past the pool's last whole slice a new pass starts over the pool in a fresh seeded order (whole
    slices only: a slice never repeats a prompt)."""
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    val = [rows[i] for i in order[:cfg.num_val]]
    pool = [rows[i] for i in order[cfg.num_val:]]
    per = cfg.prompts_per_iter
    if not pool:
        raise ValueError(f"{len(rows)} usable prompts leave none for training after --num_val "
                         f"{cfg.num_val}: use --num_val {len(rows) - 1} or less")
    if not 1 <= per <= len(pool):
        raise ValueError(f"{len(rows)} usable prompts leave {len(pool)} for training after "
                         f"--num_val {cfg.num_val}: use --prompts_per_iter 1 to {len(pool)}")
    per_pass = len(pool) // per
    slices = []
    for t in range(cfg.iterations):
        n, j = divmod(t, per_pass)                              # pass n over the pool, its slice j
        order = np.arange(len(pool))
        if n > 0:
            order = np.random.default_rng([cfg.seed, n]).permutation(len(pool))
        slices.append([pool[i] for i in order[j * per:(j + 1) * per]])
    if cfg.iterations > per_pass:
        print0(f"note: the pool holds {per_pass} slices of {per}: iterations {per_pass + 1}.."
               f"{cfg.iterations} see its prompts again, reshuffled (departure 5)")
    return val, slices


# ----------------------------------------------------------------------------- Algorithm 2
def dno_prct(run):
    """Algorithm 2 (DNO-Prct), one line per line of the paper's algorithm. -> the best iterate."""
    eval_step(run, 0)                                   # line 1: pi_1 (SFT policy) on validation
    for t in range(1, run.cfg.iterations + 1):          # line 2: for t = 1, ..., T
        D_t = run.slices[t - 1]                         # line 3: a fresh slice of prompts
        samples = sample_step(run, t, D_t)              # line 4: y_1..y_K ~ pi_t(.|x), x in D_t
        judgments = judge_step(run, t, D_t, samples)    # line 5: P on {y_1..y_K, y_gold}
        pairs = pairs_step(run, t, D_t, samples, judgments)   # lines 5-6: rank, pairs, replay
        pairs = reference_step(run, t, pairs)           # line 7: log pi_t(y|x) (or ext. 2's mix)
        train_pi(run, t, pairs)                         # line 7: pi_{t+1} by the contrastive loss
        eval_step(run, t)                               # line 9's data: pi_{t+1} on validation
    if rank() == 0:
        return stages.read_json(os.path.join(run.out, "best.json"))   # line 9: the best iterate
    return None


# ----------------------------------------------------------------------------- setup
def prepare(cfg):
    """Everything the loop needs, checked before any expensive work: flags, judge, lock, inputs,
    split. -> Run."""
    check(cfg, CHOICES, LIMITS)                         # every flag, before any model is loaded
    if cfg.pairs in ("restrictive", "spin") and not cfg.gold:   # Table 1's ablations: gold y+
        raise ValueError(f"--pairs {cfg.pairs} puts the gold response on the positive side: it "
                         "needs --gold true")
    if cfg.pairs == "spin" and cfg.target == "soft":
        raise ValueError("--pairs spin asks no judge, so there is no r_t for --target soft")
    if cfg.opponents == "samples" and cfg.num_samples < 2:
        raise ValueError("--opponents samples needs --num_samples >= 2 (a sample's r_t is against "
                         "the other samples)")
    # --threads too (applied once the size is known)
    pick_threads(cfg.threads, 0)
    if cfg.sampler == "vllm" and vllm_sampler.probe(cfg.vllm_python):   # no vLLM: one line
        raise ValueError(vllm_sampler.probe(cfg.vllm_python))
    judge, fn = oracle.make_judge(cfg)                  # a bad judge, URL or key: refused up front
    device = setup_device(cfg.device)                   # --device cuda without a GPU: one line
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.prompts and not os.path.isfile(cfg.prompts):
        raise FileNotFoundError(f"prompts file {cfg.prompts} not found")
    model = resolve_model(cfg.model) if cfg.model else ""
    if rank() == 0:
        stages.lock(cfg.out)                            # one run per folder, for the whole run
        stages.rollback(cfg.out, cfg.rollback)          # --rollback t: redo iteration t and later
    if not (model and cfg.prompts):                     # the built-in demo task, prepared once
        from demo import sft as demo_sft
        demo = os.path.join(cfg.out, "demo")
        demo_cfg = demo_sft.Config(threads=cfg.threads)    # its SFT picks its own threads
        if cfg.teacher_styles:                          # another teacher: another pi_1 and gold
            demo_cfg.teacher_styles = cfg.teacher_styles
        on_rank0(demo_sft.prepare, demo, cfg.seed, demo_cfg)
        m, p = demo_sft.prepare(demo, cfg.seed, demo_cfg, log=lambda *a: None)   # then reused
        model = model or m
        cfg.prompts = cfg.prompts or p
    barrier()
    args = ModelArgs.from_hf_config(read_config(model), os.path.join(model, "config.json"))
    tok = load_tokenizer(model)
    check_vocab(tok, args.vocab_size, model)            # ids past the embedding table: one line
    rows, skipped = load_prompts(cfg.prompts, tok, args.max_seq_len - cfg.max_new_tokens - 1)
    print0(f"prompts: {len(rows)} usable, {skipped} skipped "
           f"(prompt + max_new_tokens longer than {args.max_seq_len})")
    longest = max((len(r["prompt_tokens"]) for r in rows), default=1) + cfg.max_new_tokens + 1
    longest = min(args.max_seq_len, longest)
    est = check_memory(args, device, micro_batch=cfg.micro_batch, seq_len=longest,
                       grad_ckpt=cfg.grad_ckpt, seqs_per_item=2, shards=world(),   # a pair: 2 seqs
                       lora_rank=cfg.lora_rank)
    torch.set_num_threads(pick_threads(cfg.threads, est["params"]))   # sampling, training, eval
    print0(f"memory: ~{est['total'] / 2**30:.2f} GiB per rank to train on pairs of {longest} "
           f"tokens ({est['params'] / 1e6:.1f}M parameters, {torch.get_num_threads()} CPU threads)")
    if cfg.precision == "auto":                         # resolved: the manifests record what ran
        cfg.precision = "bf16" if device.type == "cuda" else "fp32"
    cfg.prompts_per_iter = slice_size(cfg, len(rows) - cfg.num_val)
    val, slices = split(rows, cfg)
    # pi_t's samples only (validation keeps gold)
    if not cfg.gold:
        slices = [[{**r, "gold": None} for r in D_t] for D_t in slices]
    print0("config:\n" + show(cfg))
    if rank() == 0:                                     # the resolved flags, beside the stages
        stages.write_atomic(os.path.join(cfg.out, "config.json"), json.dumps(vars(cfg), indent=1))
    tracker = tracking.open_tracker(cfg.report_to if rank() == 0 else "none", cfg.out, vars(cfg),
                                    log=print0)        # --report_to: the run config first
    return Run(cfg=cfg, out=cfg.out, pi_1=model, tok=tok, context=args.max_seq_len, val=val,
               slices=slices, skipped=skipped, device=device, judge=judge, fn=fn,
               amp=PRECISION[cfg.precision], tracker=tracker)


def main(argv=None):
    cfg = cli(Config, argv)
    run, done = None, False
    try:
        run = prepare(cfg)
        dno_prct(run)
        done = True
    except (ValueError, OSError, oracle.BudgetExceeded) as e:   # user mistakes, budget stops
        sys.exit(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    except KeyboardInterrupt:
        sys.exit("error: interrupted; finished stages are kept, rerun the same command to resume")
    finally:
        if run is not None:
            run.tracker.close()                         # --report_to: flush the last events
        stages.unlock(cfg.out)                          # the lock (the kernel drops it on a kill)
        finish_processes(together=done)                 # the process group under torchrun


if __name__ == "__main__":
    main()

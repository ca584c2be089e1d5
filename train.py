"""train.py: Direct Nash Optimization (Rosset et al. 2024), Algorithm 2 (DNO-Prct) as a program; --target soft trains
Algorithm 1's regression target instead. The loop is `dno_prct`, one line per algorithm line (docs/paper.md maps
every line of the paper's algorithms to the code).

    python train.py                                         # CPU demo: built-in task, model and judge, offline (~1 min)
    python train.py --out runs/x --model Qwen/Qwen2.5-0.5B-Instruct --prompts p.jsonl --judge rubric \
        --judge_model gpt-4o-mini --max_usd 20              # one GPU, an API judge (docs/one_gpu.md)
    torchrun --nproc_per_node=8 train.py --out runs/x --model DIR --prompts p.jsonl --judge rubric   # FSDP2
    python train.py --out runs/x --rollback 1               # discard iterations > 1 (python evaluate.py --out: report)

Prompts JSONL lines: {"prompt": text | [{"role", "content"}, ...], "gold"?: teacher response, "id"?: str}.
--out holds iter_0/eval/ (pi_1 on validation), iter_t/{samples,judgments,pairs,reference,checkpoint,eval}/ for
t = 1..T (checkpoint/ is pi_{t+1} in the HF layout), judge_cache.jsonl, judge_ledger.json (the run's judge budget),
metrics.jsonl, best.json and metrics.png. Each stage folder is atomic and records its inputs and flags: a rerun
resumes, reusing a stage only when they match (stages.py). --judge: rubric | pairwise | local (oracle.py), a
demo_task.JUDGES / oracle.SYNTHETIC name, or module:function. Under torchrun, FSDP2 on nccl (GPU) or gloo (CPU):
ranks split sampling and reference log-probs; rank 0 judges and writes (OUT must be shared).

Departures from the paper (numbered):
    1. Prompts whose tokens + max_new_tokens exceed the model's context are skipped and counted.
    2. Each response ends with the token that ended it (the sampler records it; for the gold: eos for a text
       prompt, <|im_end|> for a chat prompt when the tokenizer has it), scored in the log-probs.
    3. "Rank by win-rate" (line 5): r_t(y) is y's win-rate among the K+1 candidates (dno.winrates of the judge's
       table; rubric scores give a 1/0.5/0 table). --pairs margin keeps the paper's large-margin pairs
       (dno.select_pairs); --pairs all keeps every candidate pair.
    4. --target soft trains Alg. 1's regression target sigmoid(r_t(y+) - r_t(y-)) on the same pipeline (mu_1 =
       mu_2 = pi_t plus the gold); --target hard (default) is Alg. 2, line 7.
    5. lr_t = lr * lr_decay**(t-1) (the paper lowers it in later iterations without saying how); linear warmup,
       then cosine (or linear) decay to 0; AdamW; <= 1 epoch.
    6. The best iterate (line 9) is chosen on held-out prompts judged by the training oracle in both orders (the
       paper: AlpacaEval 2 / MT-Bench), by --select_by (default: length-controlled win-rate vs gold).
    7. A judged stage with more failures than --max_failure_rate is not committed: the run stops, the answers so
       far stay cached, a rerun re-asks only the failures. No surviving pairs stops the run too.
"""
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import dno
import evaluate
import oracle
import stages
from cli import check, cli
from model import ModelArgs, Transformer, check_memory, load_tokenizer, read_config, resolve_model
from sample import generate, load_prompts
from stages import barrier, print0, rank, read_jsonl, world


@dataclass
class Config:
    out: str = "out"                # run folder
    model: str = ""                 # pi_1: a Hugging Face folder or model id; "" = the built-in demo model (OUT/demo)
    prompts: str = ""               # prompts JSONL; "" = the built-in demo prompts
    judge: str = "demo"             # demo_task.JUDGES / oracle.SYNTHETIC name, rubric|pairwise|local, or module:fn
    iterations: int = 3             # T
    prompts_per_iter: int = 0       # size of each disjoint slice D_t; 0 = the training prompts split evenly over T
    num_val: int = 200              # held-out validation prompts (line 9: the best iterate is chosen on them)
    num_samples: int = 5            # K responses per prompt from pi_t (line 4; the paper: 5)
    max_new_tokens: int = 32        # response length cap (the demo needs 14; raise it for real tasks)
    temperature: float = 0.7        # sampling temperature (the paper: 0.7)
    top_p: float = 0.95             # nucleus sampling (the paper: 0.95)
    eval_temperature: float = 0.0   # temperature of the one validation sample per prompt (0 = greedy)
    target: str = "hard"            # hard: Alg. 2, line 7 (target 1) | soft: Alg. 1's sigmoid(r_t(y+) - r_t(y-))
    pairs: str = "margin"           # margin: large-margin pairs (line 6) | all: every candidate pair (Alg. 1's mu)
    gold: bool = True               # the gold joins pi_t's K samples as a candidate (Alg. 1's off-policy mu)
    ref_mix: float = 0.0            # extension 1: log ref = (1-ref_mix) log pi_t + ref_mix log pi_1 (dno.py)
    teacher_styles: str = ""        # built-in demo: the teacher's style mix, e.g. 0.8,0.15,0.05 ("" = demo_task's)
    eta: float = 0.1                # eta of the contrastive loss (line 7; DPO's beta); see dno.py's glossary
    lr: float = 4e-5                # peak lr of iteration 1 (demo-sized; the paper states 5e-5 for its 7B runs)
    lr_decay: float = 1.0           # lr_t = lr * lr_decay**(t-1) (departure 5; 1 = the same lr every iteration)
    warmup: float = 0.1             # fraction of the steps with linear warmup
    schedule: str = "cosine"        # cosine | linear decay after warmup
    batch_size: int = 64            # effective (global) batch of pairs per optimizer step (the paper: 64)
    micro_batch: int = 8            # pairs per forward pass per rank (gradient accumulation makes up the rest)
    epochs: float = 1.0             # passes over the pairs per iteration (the paper: <= 1)
    max_steps: int = 0              # stop after this many optimizer steps (0 = no cap)
    grad_ckpt: bool = False         # activation checkpointing per block: recompute in backward, far less memory
    precision: str = "auto"         # auto (bf16 compute on GPU, fp32 on CPU) | bf16 | fp32, for training and log-probs
    weight_decay: float = 0.0       # AdamW weight decay
    grad_clip: float = 1.0          # gradient norm clip
    replay: float = 0.3             # share of pairs replayed from t-1, halving further back (the paper: 30%, 15%, ...)
    select_by: str = "lc_vs_gold"   # best iterate by: lc_vs_gold | vs_gold | lc_vs_init | vs_init (on validation)
    seed: int = 0                   # seed of splits, sampling, replay, shuffling and batch order
    device: str = "auto"            # auto | cpu | cuda
    base_url: str = ""              # judge endpoint (OpenAI-compatible); "" = oracle's default
    judge_model: str = "gpt-4-turbo"  # judge model name (or the model folder for --judge local)
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the env var holding the judge's API key
    concurrency: int = 8            # judge requests in flight
    max_usd: float = 0.0            # judge budget in dollars for the whole run, across resumes (0 = none)
    max_calls: int = 0              # judge budget in requests for the whole run, across resumes (0 = none)
    max_failure_rate: float = 0.1   # a judged stage with more failed items than this is not committed (departure 7)
    position_audit: float = 0.1     # share of training prompts judged again in reversed order (position bias)
    judge_context: int = 128000     # the judge model's context (tokens): candidates are cut only to fit it
    rollback: int = -1              # discard iterations > rollback before running (-1 = keep all)
    stage_pause: float = 0.0        # test hook: seconds to sleep inside each stage before it commits


CHOICES = {"target": ("hard", "soft"), "pairs": ("margin", "all"), "schedule": ("cosine", "linear"),
           "select_by": ("lc_vs_gold", "vs_gold", "lc_vs_init", "vs_init"), "device": ("auto", "cpu", "cuda"),
           "precision": ("auto", "bf16", "fp32")}
PRECISION = {"auto": None, "bf16": torch.bfloat16, "fp32": False}
inf, tiny, GE0, GE1 = math.inf, 1e-300, (0, math.inf, ">= 0"), (1, math.inf, ">= 1")
POS, UNIT = (tiny, inf, "finite and > 0"), (0, 1, "in [0, 1]")
LIMITS = {  # flag: (lowest, highest, in words), checked by cli.check with CHOICES before any work
    "iterations": GE1, "num_val": GE1, "prompts_per_iter": GE0, "num_samples": GE1, "max_new_tokens": GE1,
    "temperature": (0, inf, "finite and >= 0"), "eval_temperature": (0, inf, "finite and >= 0"),
    "top_p": (tiny, 1, "in (0, 1]"), "eta": POS, "lr": POS, "lr_decay": POS, "warmup": (0, 1 - 1e-9, "in [0, 1)"),
    "batch_size": GE1, "micro_batch": GE1, "epochs": POS, "max_steps": GE0, "weight_decay": GE0, "grad_clip": POS,
    "replay": (0, 0.5 - 1e-12, "in [0, 0.5): 0.3 + 0.15 + ... must stay below 1"), "concurrency": GE1,
    "max_usd": GE0, "max_calls": GE0, "max_failure_rate": UNIT, "position_audit": UNIT,
    "judge_context": (256, inf, ">= 256"), "ref_mix": UNIT, "rollback": (-1, inf, ">= -1"), "stage_pause": GE0}


@dataclass
class Run:
    """What every step of the loop reads: the config, pi_1, the prompts split into D_1..D_T and validation."""
    cfg: Config
    out: str                        # the run folder
    pi_1: str                       # the initial policy's folder
    tok: object                     # its tokenizer (every iterate shares it)
    context: int                    # the policy's context length, in tokens
    val: list                       # validation prompt rows {"id", "prompt", "gold", "prompt_tokens"}
    slices: list                    # D_1..D_T, disjoint lists of prompt rows
    skipped: int                    # over-long prompts skipped (departure 1)
    device: torch.device
    judge: oracle.Config            # the preference oracle P (with the run-wide cache and ledger)
    fn: object = None               # a Python judge function, when --judge names one
    amp: object = None              # autocast dtype of log-probs: None = bf16 on GPU only, torch.bfloat16, False


# ----------------------------------------------------------------------------- data and models
def split(rows, cfg):
    """Held-out validation + T disjoint training slices D_t (the paper split its prompts over the iterations)."""
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    val, train = [rows[i] for i in order[:cfg.num_val]], [rows[i] for i in order[cfg.num_val:]]
    per = cfg.prompts_per_iter or len(train) // cfg.iterations
    if per < 1 or per * cfg.iterations > len(train):
        raise ValueError(f"{len(rows)} usable prompts cannot give {cfg.num_val} validation prompts and "
                         f"{cfg.iterations} slices of {per or 'at least 1'}")
    return val, [train[t * per:(t + 1) * per] for t in range(cfg.iterations)]


def response_tokens(tok, row, cand, context):
    """Token ids of a candidate (a sample dict or the gold string) with the token that ended it (departure 2)."""
    if isinstance(cand, str):
        im_end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
        end = im_end if isinstance(row["prompt"], list) and im_end is not None else tok.eos_token_id
        ids = tok.encode(cand, add_special_tokens=False) + [end]
    else:
        ids = cand["tokens"] + ([cand["stop_token"]] if cand.get("stop_token") is not None else [])
    return ids[:max(1, context - len(row["prompt_tokens"]))]


def candidates(row, sample):
    """The K+1 candidates of line 5: pi_t's K samples, then the gold response (if any) as the last column."""
    return sample["samples"] + ([row["gold"]] if row["gold"] else [])


def load_policy(path, device):
    return Transformer.from_pretrained(path, device=device), load_tokenizer(path)


def policy_dir(run, t):
    """pi_t: the initial policy for t = 1, else the checkpoint trained in iteration t-1."""
    return run.pi_1 if t <= 1 else stage_dir(run, t - 1, "checkpoint")


def stage_dir(run, t, name, file=None):
    p = os.path.join(run.out, f"iter_{t}", name)
    return os.path.join(p, file) if file else p


def sample_split(run, policy, rows, k, seed, temperature):
    """k samples per prompt from a policy; prompts split across ranks, gathered in order."""
    model, tok = load_policy(policy, run.device)
    mine = rows[rank()::world()]
    outs = generate(model, tok, [r["prompt"] for r in mine], num_samples=k, max_new_tokens=run.cfg.max_new_tokens,
                    temperature=temperature, top_p=run.cfg.top_p, seed=seed, ids=[r["id"] for r in mine],
                    progress=rank() == 0)
    by_id = dict(stages.gather([(r["id"], o) for r, o in zip(mine, outs)]))
    return [{"id": r["id"], "samples": by_id[r["id"]]} for r in rows]


# ----------------------------------------------------------------------------- the steps of iteration t
def step(run, t, name, make, inputs, flags, rank0=False):
    """OUT/iter_t/<name>, reused if done from the same inputs and flags, else made by make (on rank 0 if rank0)."""
    path = stage_dir(run, t, name)
    want = stages.shape(inputs, {f: getattr(run.cfg, f) for f in flags})
    if not stages.is_done(path, want):
        print0(f"iter {t} | {name}: start")
        stages.on_rank0(make, run, t, path, want) if rank0 else make(run, t, path, want)
        barrier()
    return path


def commit(run, path, want, files, counts, save=None):
    name, t = os.path.basename(path), int(os.path.basename(os.path.dirname(path))[5:])
    stages.commit(path, files, {"stage": name, "iter": t, "shape": want, "counts": counts}, run.cfg, save=save,
                  pause=run.cfg.stage_pause)


def sample_step(run, t, D_t):
    """Line 4: K samples per prompt of D_t from pi_t."""
    def make(run, t, path, want):
        out = sample_split(run, policy_dir(run, t), D_t, run.cfg.num_samples, run.cfg.seed * 1000 + t,
                           run.cfg.temperature)
        if rank() == 0:
            commit(run, path, want, {"samples.jsonl": out}, {"prompts": len(D_t), "skipped_long_prompts": run.skipped,
                                                             "samples": sum(len(o["samples"]) for o in out)})
    return step(run, t, "samples", make, {"policy": policy_dir(run, t), "prompts": D_t},
                ["num_samples", "max_new_tokens", "temperature", "top_p", "seed", "num_val"])


def judge_step(run, t, D_t, samples):
    """Line 5: the oracle judges the K+1 candidates of each prompt (shuffled, cached, budgeted for the run)."""
    def make(run, t, path, want):
        rows = {r["id"]: r for r in D_t}
        items = [{"id": f"train{t}:{s['id']}", "prompt": rows[s["id"]]["prompt"],
                  "candidates": [c if isinstance(c, str) else c["text"] for c in candidates(rows[s["id"]], s)],
                  "gold_index": len(s["samples"]) if rows[s["id"]]["gold"] else None}
                 for s in read_jsonl(os.path.join(samples, "samples.jsonl"))]
        results, summary = evaluate.ask(run, items, f"iter {t} judgments")
        commit(run, path, want, {"judgments.jsonl": [{**r, "id": s["id"][len(f"train{t}:"):]}
                                                     for r, s in zip(results, items)]},
               {"items": len(items), "ok": sum(r["ok"] for r in results), "judge": {
                   k: summary.get(k) for k in ("order_disagreement", "position", "truncated")}})
    return step(run, t, "judgments", make, {"samples": samples}, ["judge", "judge_model", "position_audit"],
                rank0=True)


def pairs_step(run, t, D_t, samples, judgments):
    """Lines 5-6: rank the K+1 candidates by win-rate r_t and keep (y+, y-) pairs (departure 3), plus replay."""
    previous = [stage_dir(run, u, "pairs", "pairs.jsonl") for u in range(1, t)]   # iterations 1..t-1
    def make(run, t, path, want):
        rows = {r["id"]: r for r in D_t}
        judged = {j["id"]: j for j in read_jsonl(os.path.join(judgments, "judgments.jsonl"))}
        current, tables, teacher = [], [], []
        for s in read_jsonl(os.path.join(samples, "samples.jsonl")):       # joined by id, never by position
            row, res = rows.get(s["id"]), judged.get(s["id"])
            if row is None or res is None:
                raise stages.StageError(f"{samples}: prompt id {s['id']!r} has no prompt row or no judgment")
            if not res["ok"]:
                continue                                        # a failed judgment never becomes a pair
            cands, gold = candidates(row, s), len(s["samples"]) if row["gold"] else None
            texts = [c if isinstance(c, str) else c["text"] for c in cands]
            r_t = dno.winrates(res["P"])                        # (K+1,) r_t(y) estimated among the candidates
            tables.append(res["P"])
            teacher += [] if gold is None else [(r_t[gold], res["scores"][gold])]
            bad = [dno.is_defective(x) for x in texts]
            chosen = (dno.select_pairs(res["scores"], gold, bad, kind=res["score_kind"]) if run.cfg.pairs == "margin"
                      else dno.all_pairs(r_t, bad, gold))       # line 6 (or Alg. 1's all pairs)
            for p in chosen:
                current.append({"id": s["id"], "iter": t, "prompt_tokens": row["prompt_tokens"], **p,
                                "r_chosen": float(r_t[p["chosen"]]), "r_rejected": float(r_t[p["rejected"]]),
                                "chosen_tokens": response_tokens(run.tok, row, cands[p["chosen"]], run.context),
                                "rejected_tokens": response_tokens(run.tok, row, cands[p["rejected"]], run.context)})
        old = [[p for p in read_jsonl(f) if p["iter"] == u] for u, f in enumerate(previous, 1)][::-1]   # t-1 first
        pairs = dno.replay(current, old, seed=run.cfg.seed * 1000 + t, shares=dno.replay_shares(run.cfg.replay,
                                                                                                len(old)))
        if not pairs:
            raise ValueError(f"iteration {t}: no pairs survived selection ({len(tables)}/{len(judged)} prompts judged "
                             f"ok); nothing to train on - inspect {judgments} or change the judge")
        prov = {k: sum(p["provenance"] == k for p in current) for k in dno.PROVENANCE} | {
            "replay": len(pairs) - len(current)}
        print0(f"pairs: {len(pairs)} ({prov}) from {len(tables)}/{len(judged)} judged prompts")
        commit(run, path, want, {"pairs.jsonl": pairs}, {
            "pairs": len(pairs), "provenance": prov, "judged_ok": len(tables), "judged": len(judged),
            "preferences": dno.diagnostics(tables),             # cycles, BT vs win-rate ranking (evaluate.py)
            "teacher_winrate": float(np.mean([w for w, _ in teacher])) if teacher else None,
            "teacher_score": float(np.mean([s for _, s in teacher])) if teacher else None})
    return step(run, t, "pairs", make, {"prompts": D_t, "samples": samples, "judgments": judgments,
                                        **{f"pairs_{u}": p for u, p in enumerate(previous, 1)}},
                ["pairs", "replay", "seed"], rank0=True)


def pair_len(p):
    """Padded length of a pair's two sequences (chosen and rejected share one right-padded batch)."""
    return len(p["prompt_tokens"]) + max(len(p["chosen_tokens"]), len(p["rejected_tokens"]))


def reference_step(run, t, pairs):
    """Line 7's reference log pi_t(y+|x), log pi_t(y-|x), once, stored with the pairs: training holds one model.
    --ref_mix beta > 0: the smoothed reference (1 - beta) log pi_t + beta log pi_1 (extension 1, dno.py)."""
    @torch.no_grad()
    def make(run, t, path, want):
        P, (model, _) = read_jsonl(os.path.join(pairs, "pairs.jsonl")), load_policy(policy_dir(run, t), run.device)
        init = load_policy(run.pi_1, run.device)[0] if run.cfg.ref_mix > 0 else None
        mine, got, mb = sorted(range(len(P))[rank()::world()], key=lambda i: pair_len(P[i])), [], run.cfg.micro_batch
        for k in range(0, len(mine), mb):                       # similar lengths share a batch: little padding
            c, r, _ = dno.pair_logps(model, [P[i] for i in mine[k:k + mb]], run.device, run.amp)   # (m,) pi_t
            if init is not None:                                # (m,) log pi_1, then the geometric mixture
                c1, r1, _ = dno.pair_logps(init, [P[i] for i in mine[k:k + mb]], run.device, run.amp)
                c = dno.geometric_reference(c, c1, run.cfg.ref_mix)
                r = dno.geometric_reference(r, r1, run.cfg.ref_mix)
            got += list(zip(mine[k:k + mb], c.tolist(), r.tolist()))
        for i, c, r in stages.gather(got):
            P[i].update(ref_chosen=c, ref_rejected=r)
        if rank() == 0:
            commit(run, path, want, {"pairs.jsonl": P}, {"pairs": len(P)})
    return step(run, t, "reference", make, {"policy": policy_dir(run, t), "pairs": pairs}, ["ref_mix"])


def train_pi(run, t, pairs):
    """Line 7: pi_{t+1} = argmax of the contrastive objective on the pairs, reference pi_t (dno.dno_loss)."""
    def make(run, t, path, want):
        model, tok = load_policy(policy_dir(run, t), run.device)
        stages.for_training(model, run.cfg.grad_ckpt, bf16=run.amp is torch.bfloat16 or (   # FSDP2 under torchrun
            run.amp is None and run.device.type == "cuda"))
        log = optimize(model, read_jsonl(os.path.join(pairs, "pairs.jsonl")), run, t)
        sd = stages.full_state_dict(model)                      # under torchrun: gathered on CPU, else None
        if rank() == 0:
            commit(run, path, want, {"train_log.jsonl": log}, {"steps": len(log)},
                   save=lambda d: model.save_pretrained(d, tokenizer=tok, state_dict=sd))
    return step(run, t, "checkpoint", make, {"policy": policy_dir(run, t), "pairs": pairs},
                ["target", "eta", "lr", "lr_decay", "warmup", "schedule", "batch_size", "epochs", "max_steps",
                 "weight_decay", "grad_clip", "seed"])


def eval_step(run, t):
    """Line 9's data: pi_{t+1} (pi_1 at t = 0) answers the validation prompts, judged vs pi_1 and gold."""
    policy, seed = run.pi_1 if t == 0 else stage_dir(run, t, "checkpoint"), run.cfg.seed * 1000 + 999

    def make(run, t, path, want):
        outs = sample_split(run, policy, run.val, 1, seed, run.cfg.eval_temperature)
        stages.on_rank0(evaluate.judge_eval, run, t, path, outs, lambda files, counts: commit(
            run, path, want, files, counts))
    init = {} if t == 0 else {"init": stage_dir(run, 0, "eval", "samples.jsonl")}
    path = step(run, t, "eval", make, {"policy": policy, "val": run.val, **init},
                ["num_val", "max_new_tokens", "eval_temperature", "top_p", "seed", "judge", "judge_model"])
    stages.on_rank0(evaluate.report, run.out, run.cfg.select_by, t == run.cfg.iterations)   # metrics.jsonl, table
    return path


# ----------------------------------------------------------------------------- training (line 7)
def train_step(model, opt, pairs, batch, cfg, device, amp=None):
    """One optimizer step on a global batch of pairs; each rank takes batch[rank::world] in micro-batches
    (gradient accumulation). -> float64 tensor [loss sum, margin sum, accuracy sum, pairs, tokens]."""
    batch = sorted(batch, key=lambda i: pair_len(pairs[i]))    # the gradient is a sum: order is free, pad little
    mine = batch[rank()::world()]
    n_micro = math.ceil(math.ceil(len(batch) / world()) / cfg.micro_batch)
    acc = torch.zeros(5, dtype=torch.float64)
    for k in range(n_micro):
        chunk, weight = mine[k * cfg.micro_batch:(k + 1) * cfg.micro_batch], 1.0
        if not chunk:                                           # every rank runs the same passes (FSDP collectives)
            chunk, weight = batch[:1], 0.0
        if world() > 1:
            model.set_requires_gradient_sync(k == n_micro - 1)
        P, m = [pairs[i] for i in chunk], len(chunk)
        logp_c, logp_r, ntok = dno.pair_logps(model, P, device, amp)   # (m,) log pi(y+|x), log pi(y-|x)
        ref = torch.tensor([[p["ref_chosen"], p["ref_rejected"]] for p in P], device=device)   # (m, 2) pi_t
        r = torch.tensor([[p["r_chosen"], p["r_rejected"]] for p in P], device=device)         # (m, 2) r_t
        target = 1.0 if cfg.target == "hard" else dno.soft_target(r[:, 0], r[:, 1])   # Alg. 2 | Alg. 1 (m,)
        losses, st = dno.dno_loss(logp_c, logp_r, ref[:, 0], ref[:, 1], target=target, eta=cfg.eta)  # (m,)
        # the mean over the global batch; FSDP averages gradients over ranks, hence * world
        (losses.sum() * (weight * world() / len(batch))).backward()
        acc += weight * torch.tensor([losses.sum().item(), st["margin"].item() * m, st["accuracy"].item() * m, m,
                                      ntok], dtype=torch.float64)
    acc = stages.sum_over_ranks(acc, device)
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return acc


def optimize(model, pairs, run, t):
    """AdamW over <= epochs passes of the pairs, warmup then cosine/linear decay (departure 5). -> step log."""
    from tqdm import tqdm
    cfg = run.cfg
    lr_t = cfg.lr * cfg.lr_decay ** (t - 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr_t, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + t)
    order = torch.cat([torch.randperm(len(pairs), generator=g) for _ in range(math.ceil(cfg.epochs))]).tolist()
    order = order[:max(1, round(len(pairs) * cfg.epochs))]
    steps = math.ceil(len(order) / cfg.batch_size)
    steps = min(steps, cfg.max_steps) if cfg.max_steps else steps
    warm, log = max(1, round(cfg.warmup * steps)), []
    for s in tqdm(range(steps), disable=rank() != 0, desc=f"train iter {t}", file=sys.stderr):
        t0, frac = time.time(), (s + 1 - warm) / max(1, steps - warm)
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1 - frac
        lr = lr_t * ((s + 1) / warm if s < warm else decay)
        for group in opt.param_groups:
            group["lr"] = lr
        acc = train_step(model, opt, pairs, order[s * cfg.batch_size:(s + 1) * cfg.batch_size], cfg, run.device,
                         run.amp)
        n = acc[3].item()
        log.append({"step": s + 1, "loss": acc[0].item() / n, "margin": acc[1].item() / n, "acc": acc[2].item() / n,
                    "lr": lr})
        if rank() == 0:
            tqdm.write(f"step {s + 1} | loss {log[-1]['loss']:.4f} | margin {log[-1]['margin']:.4f} | "
                       f"acc {log[-1]['acc']:.3f} | lr {lr:.3e} | tok/s {acc[4].item() / (time.time() - t0):.0f}")
    return log


# ----------------------------------------------------------------------------- Algorithm 2
def dno_prct(run):
    """Algorithm 2 (DNO-Prct), one line per line of the paper's algorithm (docs/paper.md). -> the best iterate."""
    eval_step(run, 0)                                           # line 1: pi_1 = the SFT policy, on validation
    for t in range(1, run.cfg.iterations + 1):                  # line 2: for t = 1, ..., T
        D_t = run.slices[t - 1]                                 # line 3: a fresh slice of prompts, each with gold
        samples = sample_step(run, t, D_t)                      # line 4: y_1..y_K ~ pi_t(.|x) for x in D_t
        judgments = judge_step(run, t, D_t, samples)            # line 5: P on {y_1..y_K, y_gold}
        pairs = pairs_step(run, t, D_t, samples, judgments)     # lines 5-6: rank, large-margin pairs (+ replay)
        pairs = reference_step(run, t, pairs)                   # line 7: log pi_t(y|x), the reference
        train_pi(run, t, pairs)                                 # line 7: pi_{t+1} by the contrastive loss
        eval_step(run, t)                                       # line 9's data: pi_{t+1} on validation
    return json.load(open(os.path.join(run.out, "best.json"))) if rank() == 0 else None   # line 9: the best


# ----------------------------------------------------------------------------- setup
def prepare(cfg):
    """Everything the loop needs, checked before any expensive work: flags, judge, lock, inputs, split. -> Run."""
    check(cfg, CHOICES, LIMITS)                                 # every flag, before any model is loaded or built
    device = stages.setup(cfg.device)                           # --device cuda without a GPU: one line
    print0("config: " + json.dumps(vars(cfg)))
    os.makedirs(cfg.out, exist_ok=True)
    judge, fn = evaluate.make_judge(cfg)                        # a bad --judge is refused before the demo's SFT
    if cfg.prompts and not os.path.isfile(cfg.prompts):
        raise FileNotFoundError(f"prompts file {cfg.prompts} not found")
    model = resolve_model(cfg.model) if cfg.model else ""
    if rank() == 0:
        stages.lock(cfg.out)                                    # one run per folder
        stages.rollback(cfg.out, cfg.rollback)                  # --rollback t: discard iterations > t
    if not (model and cfg.prompts):                             # the built-in demo task, prepared once in OUT/demo
        import demo_task
        demo = demo_task.Config(**({"teacher_styles": cfg.teacher_styles} if cfg.teacher_styles else {}))
        stages.on_rank0(demo_task.prepare, os.path.join(cfg.out, "demo"), cfg.seed, demo)
        m, p = demo_task.prepare(os.path.join(cfg.out, "demo"), cfg.seed, demo, log=lambda *a: None)  # reused
        model, cfg.prompts = model or m, cfg.prompts or p
    barrier()
    args, tok = ModelArgs.from_hf_config(read_config(model), os.path.join(model, "config.json")), load_tokenizer(model)
    rows, skipped = load_prompts(cfg.prompts, tok, args.max_seq_len - cfg.max_new_tokens - 1)
    print0(f"prompts: {len(rows)} usable, {skipped} skipped (prompt + max_new_tokens longer than {args.max_seq_len})")
    longest = min(args.max_seq_len, max((len(r["prompt_tokens"]) for r in rows), default=1) + cfg.max_new_tokens + 1)
    est = check_memory(args, device, micro_batch=cfg.micro_batch, seq_len=longest, grad_ckpt=cfg.grad_ckpt,
                       seqs_per_item=2, shards=world())             # a pair is two sequences; FSDP shards the rest
    print0(f"memory: ~{est['total'] / 2**30:.2f} GiB per rank to train on pairs of {longest} tokens "
           f"({est['params'] / 1e6:.1f}M parameters)")
    val, slices = split(rows, cfg)
    if not cfg.gold:                                            # pi_t's samples only (validation keeps its gold)
        slices = [[{**r, "gold": None} for r in D_t] for D_t in slices]
    return Run(cfg=cfg, out=cfg.out, pi_1=model, tok=tok, context=args.max_seq_len, val=val, slices=slices,
               skipped=skipped, device=device, judge=judge, fn=fn, amp=PRECISION[cfg.precision])


def main(argv=None):
    cfg = cli(Config, argv)
    try:
        dno_prct(prepare(cfg))
    except (ValueError, OSError, oracle.BudgetExceeded) as e:    # user mistakes and budget stops: one line
        sys.exit(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    except KeyboardInterrupt:
        sys.exit("error: interrupted; finished stages are kept, rerun the same command to resume")
    finally:
        stages.finish(cfg.out)                                  # the lock, and the process group under torchrun


if __name__ == "__main__":
    main()

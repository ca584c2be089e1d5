"""train.py: Algorithm 2 of Direct Nash Optimization (DNO-Prct, Rosset et al. 2024) as a program.

Usage:
    python train.py --out runs/demo                         # CPU smoke run: built-in demo task + judge, offline
    python train.py --out runs/x --model DIR --prompts p.jsonl --judge rubric --judge_model gpt-4-turbo --max_usd 50
    torchrun --nproc_per_node=8 train.py --out runs/x --model DIR --prompts p.jsonl --judge rubric   # FSDP2
    python train.py --out runs/x --rollback 1               # discard iterations > 1, then continue from there

Prompts JSONL lines: {"prompt": text | [{"role", "content"}, ...], "gold"?: teacher response, "id"?: str}.
Layout of --out (every stage folder is written to <name>.tmp and renamed, with its `done` marker last):
    iter_0/eval/                                   pi_1 on the validation prompts (evaluated once)
    iter_t/{samples,judgments,pairs,reference,checkpoint,eval}/   t = 1..T; checkpoint/ is pi_{t+1} (HF layout)
    judge_cache.jsonl  every oracle answer (a rerun never pays twice)   metrics.jsonl  best.json  metrics.png
A rerun resumes at the first stage without `done`; a budget stop (--max_usd/--max_calls) exits with one line.
Everything is seeded and deterministic on CPU, so a killed-and-resumed run equals an uninterrupted one.
--judge: a demo_task.JUDGES / oracle.SYNTHETIC name, rubric | pairwise | local (oracle.py), or module:function.
torchrun (WORLD_SIZE > 1): FSDP2 on nccl (GPU, bf16 compute) or gloo (CPU); prompts are split across ranks for
sampling and reference log-probs, rank 0 judges and writes (OUT must be shared by all ranks' machines).

Departures from the paper (numbered):
    1. Prompts whose tokens + max_new_tokens exceed the model's context are skipped (count logged and stored
       in the manifests). Malformed lines, missing or empty prompts are one-line errors with the line number.
    2. Each response ends with an end token that is scored in the log-probs (eos for text prompts, <|im_end|>
       for chat prompts when the tokenizer has it); a gold response longer than the context is cut.
    3. "Rank by win-rate": rubric scores (listwise judges) go to dno.select_pairs(kind="rubric"); a judge
       that returns a preference table P goes through dno.winrates and kind="winrate".
    4. Learning rate: lr_t = lr * lr_decay**(t-1). The paper lowers it in later iterations (say --lr_decay 0.5);
       the demo's default keeps it constant (1.0): its tiny policy needs all three iterations to fix the teacher's
       mistakes. Linear warmup over `warmup` of the steps, then cosine (or linear) decay to 0; AdamW; batch 64;
       <= 1 epoch.
    5. Evaluation uses the training oracle on held-out prompts (the paper: AlpacaEval 2 / MT-Bench), both
       candidate orders; the best iterate is the one with the highest win-rate vs gold (vs pi_1 if no gold).
    6. Length-controlled win-rate: logistic regression of the judgment on tanh(length difference / its std),
       read at zero difference (AlpacaEval 2's idea, not its exact model).
    7. No surviving pairs (and nothing to replay) stops the run with a one-line error, keeping the judgments.
    8. Evaluation samples greedily by default (--eval_temperature 0): one answer per validation prompt, no
       sampling noise in the win-rates.
"""
import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

import dno
import oracle
from model import Transformer
from sample import encode_prompt, generate, read_prompts
from cli import cli

STAGES = ["samples", "judgments", "pairs", "reference", "checkpoint", "eval"]


@dataclass
class Config:
    out: str = "out"                # run folder
    model: str = ""                 # pi_1, a Hugging Face folder; "" = build the built-in demo model in OUT/demo
    prompts: str = ""               # prompts JSONL; "" = the built-in demo prompts
    judge: str = "demo"             # demo_task.JUDGES / oracle.SYNTHETIC name, rubric|pairwise|local, or module:fn
    iterations: int = 3             # T
    prompts_per_iter: int = 0       # size of each disjoint slice; 0 = the training prompts split evenly over T
    num_val: int = 200              # held-out validation prompts
    num_samples: int = 5            # K responses per prompt from pi_t (Alg. 2, line 2)
    max_new_tokens: int = 32        # response length cap (the demo needs 14; raise it for real tasks)
    temperature: float = 0.7        # sampling temperature (the paper: 0.7)
    top_p: float = 0.95             # nucleus sampling (the paper: 0.95)
    eval_temperature: float = 0.0   # temperature of the one validation sample per prompt (0 = greedy)
    eta: float = 0.1                # eta (DPO's beta) of the loss
    lr: float = 4e-5                # peak learning rate of iteration 1 (demo-sized; ~5e-7 for 7B models)
    lr_decay: float = 1.0           # lr_t = lr * lr_decay**(t-1) (departure 4; 1 = the same lr every iteration)
    warmup: float = 0.1             # fraction of the steps with linear warmup
    schedule: str = "cosine"        # cosine | linear decay after warmup
    batch_size: int = 64            # effective (global) batch of pairs per optimizer step
    micro_batch: int = 8            # pairs per forward pass per rank (gradient accumulation makes up the rest)
    epochs: float = 1.0             # passes over the pairs per iteration (the paper: <= 1)
    max_steps: int = 0              # stop after this many optimizer steps (0 = no cap)
    grad_ckpt: bool = False         # activation checkpointing per block: recompute in backward, far less memory
    weight_decay: float = 0.0       # AdamW weight decay
    grad_clip: float = 1.0          # gradient norm clip
    replay: str = "0.3,0.15"        # shares of the training set replayed from iterations t-1, t-2, ...
    seed: int = 0                   # seed of splits, sampling, replay and batch order
    device: str = "auto"            # auto | cpu | cuda
    base_url: str = ""              # judge endpoint (OpenAI-compatible); "" = oracle's default
    judge_model: str = "gpt-4-turbo"  # judge model name (or the model folder for --judge local)
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the env var holding the judge's API key
    concurrency: int = 8            # judge requests in flight
    max_usd: float = 0.0            # judge budget in dollars, whole run (0 = none)
    max_calls: int = 0              # judge budget in requests (0 = none)
    rollback: int = -1              # discard iterations > rollback before running (-1 = keep all)
    stage_pause: float = 0.0        # test hook: seconds to sleep inside each stage before it commits


# ----------------------------------------------------------------------------- processes, files, manifests
def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def print0(*a):
    if rank() == 0:
        print(*a, flush=True)


def barrier():
    if world() > 1:
        dist.barrier()


def on_rank0(fn, *args):
    """Run fn on rank 0 only (judging, writing); a user-facing error there stops every rank with one line."""
    err = None
    if rank() == 0:
        try:
            fn(*args)
        except (ValueError, OSError, oracle.BudgetExceeded) as e:
            if world() == 1:
                raise
            err = str(e)
    if world() > 1:
        box = [err]
        dist.broadcast_object_list(box, src=0)
        if box[0]:
            raise SystemExit(f"error: {box[0]}")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def sha(path):
    """sha256 of a file, or of a folder's files (by name; files > 64 MB contribute name and size only)."""
    h = hashlib.sha256()
    paths = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, n) for d, _, ns in os.walk(path) for n in ns if n not in ("manifest.json", "done"))
    for p in paths:
        h.update(os.path.relpath(p, path).encode())
        size = os.path.getsize(p)
        h.update(str(size).encode() if size > 64 << 20 else open(p, "rb").read())
    return h.hexdigest()[:16]


def commit(cfg, path, files, manifest, save=None):
    """Write a stage atomically: files + manifest into PATH.tmp, `done` last, then one os.replace."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if save:
        save(tmp)                                               # e.g. the HF checkpoint
    for name, rows in files.items():
        with open(os.path.join(tmp, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows) if name.endswith(".jsonl") else json.dump(rows, f)
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump({"config": asdict(cfg), **manifest}, f, indent=1)
    time.sleep(cfg.stage_pause)                                 # test hook: a kill lands inside the stage
    open(os.path.join(tmp, "done"), "w").close()
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- data
def load_prompts(path, tok, max_prompt_tokens):
    """-> (rows, n_skipped). sample.read_prompts checks each line (one-line errors with the line number); here the
    optional gold response, unique ids, and over-long prompts, which are skipped and counted (departure 1)."""
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
        rows.append({"id": rid, "prompt": r["prompt"], "gold": r.get("gold") or None, "prompt_tokens": ids})
    return rows, skipped


def split(rows, cfg):
    """Held-out validation + T disjoint training slices (the paper split its prompts over the iterations)."""
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    val, train = [rows[i] for i in order[:cfg.num_val]], [rows[i] for i in order[cfg.num_val:]]
    per = cfg.prompts_per_iter or len(train) // cfg.iterations
    if per < 1 or per * cfg.iterations > len(train):
        raise ValueError(f"{len(rows)} usable prompts cannot give {cfg.num_val} validation prompts and "
                         f"{cfg.iterations} slices of {per or 'at least 1'}")
    return val, [train[t * per:(t + 1) * per] for t in range(cfg.iterations)]


def end_id(tok, prompt):
    """The token that ends a response (departure 2)."""
    im_end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
    return im_end if isinstance(prompt, list) and im_end is not None else tok.eos_token_id


def response_tokens(tok, row, cand, context):
    """Token ids of a candidate (a sample dict or the gold string) incl. its end token, cut to the context."""
    if isinstance(cand, str):
        ids = tok.encode(cand, add_special_tokens=False) + [end_id(tok, row["prompt"])]
    else:
        ids = cand["tokens"] + ([end_id(tok, row["prompt"])] if cand["finish_reason"] == "stop" else [])
    return ids[:context - len(row["prompt_tokens"])]


# ----------------------------------------------------------------------------- models
def load_policy(path, device):
    from transformers import AutoTokenizer
    return Transformer.from_pretrained(path, device=device), AutoTokenizer.from_pretrained(path)


def amp(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def sample_split(cfg, policy, rows, k, seed, temperature, device):
    """K samples per prompt from pi (Alg. 2, line 2); prompts split across ranks, gathered in order."""
    model, tok = load_policy(policy, device)
    mine = rows[rank()::world()]
    outs = generate(model, tok, [r["prompt"] for r in mine], num_samples=k, max_new_tokens=cfg.max_new_tokens,
                    temperature=temperature, top_p=cfg.top_p, seed=seed, ids=[r["id"] for r in mine],
                    progress=rank() == 0)
    got = [(r["id"], o) for r, o in zip(mine, outs)]
    if world() > 1:
        parts = [None] * world()
        dist.all_gather_object(parts, got)
        got = [x for p in parts for x in p]
    by_id = dict(got)
    return [{"id": r["id"], "samples": by_id[r["id"]]} for r in rows]


def sequence_batch(model, seqs, device):
    """log pi(y|x) summed over response tokens for [(prompt_ids, response_ids)] -> (B,); right padding."""
    T = max(len(p) + len(r) for p, r in seqs)
    idx = torch.zeros(len(seqs), T, dtype=torch.long)          # (B, T), pad id 0 is masked out
    mask = torch.zeros(len(seqs), T - 1)                        # (B, T-1) over next-token targets
    for i, (p, r) in enumerate(seqs):
        idx[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p) - 1:len(p) + len(r) - 1] = 1             # targets that are response tokens
    idx, sel = idx.to(device), mask.to(device).bool()
    with amp(device):   # the vocab projection and log-softmax run on the N response positions only (fused)
        tok = model(idx[:, :-1], select=sel, targets=idx[:, 1:][sel])   # (N,) log pi(y_t | x, y_<t)
    # back to (B, T-1) with zeros elsewhere, then the sum over tokens (as dno.sequence_logps, which is the slow oracle)
    logp = tok.new_zeros(sel.shape).masked_scatter(sel, tok).sum(-1)    # (B,)
    return logp, sum(len(p) + len(r) for p, r in seqs)


# ----------------------------------------------------------------------------- evaluation helpers
def lc_winrate(y, d):
    """Length-controlled win-rate (departure 6): fit y ~ sigmoid(a + b * tanh(d / std d)), report sigmoid(a)."""
    y, d = np.asarray(y, float), np.asarray(d, float)
    if len(y) == 0:
        return None
    X = np.stack([np.ones_like(d), np.tanh(d / (d.std() or 1.0))], 1)   # (N, 2)
    w = np.zeros(2)
    for _ in range(50):                                         # Newton steps on the (soft-label) log-loss
        p = 1 / (1 + np.exp(-X @ w))
        H = (X * (p * (1 - p))[:, None]).T @ X + 1e-3 * np.eye(2)
        w -= np.linalg.solve(H, X.T @ (p - y) + 1e-3 * w)
    return float(1 / (1 + np.exp(-w[0])))


def compare(results, lengths, audit):
    """Judgments [ab, ba, ab, ba, ...] of pi_{t+1} vs an opponent, both orders -> (win-rate, LC win-rate);
    audit counts judgments, failures, ties and order disagreements."""
    wins, ys, ds = [], [], []
    for ab, ba, d in zip(results[::2], results[1::2], lengths):
        p = [ab["P"][0][1] if ab["ok"] else None, 1 - ba["P"][0][1] if ba["ok"] else None]  # P(new > other)
        ok = [x for x in p if x is not None]
        audit["n"], audit["failed"], audit["ties"] = audit["n"] + 2, audit["failed"] + 2 - len(ok), \
            audit["ties"] + sum(x == 0.5 for x in ok)
        if len(ok) == 2:
            audit["both"], audit["disagree"] = audit["both"] + 1, audit["disagree"] + ((ok[0] - .5) * (ok[1] - .5) < 0)
        wins += [float(np.mean(ok))] if ok else []
        ys, ds = ys + ok, ds + [d] * len(ok)
    return (float(np.mean(wins)) if wins else None), lc_winrate(ys, ds)


# ----------------------------------------------------------------------------- the stages of iteration t
def policy_dir(R, t):
    """pi_t: the initial policy for t = 1, else the checkpoint trained in iteration t-1."""
    return R["model"] if t <= 1 else os.path.join(R["out"], f"iter_{t - 1}", "checkpoint")


def stage_path(R, t, stage, name=None):
    p = os.path.join(R["out"], f"iter_{t}", stage)
    return os.path.join(p, name) if name else p


def manifest(stage, t, seeds, inputs, counts):
    return {"stage": stage, "iter": t, "seeds": seeds, "inputs": {k: sha(v) for k, v in inputs.items()},
            "counts": counts}


def judge(R, items):
    """Ask the oracle (cached at OUT/judge_cache.jsonl: a rerun never repeats a paid request)."""
    results, summary = oracle.judge_items(items, R["ocfg"], fn=R["fn"], progress=True)
    print0(f"judge: {summary['items']} items, {summary['ok']} ok, {summary['calls']} calls, "
           f"{summary['cache_hits']} cached, ${summary['usd']:.4f}")
    return [{k: v for k, v in r.items() if k != "cached"} for r in results]


def stage_samples(cfg, R, t, path):
    rows, seed = R["slices"][t - 1], cfg.seed * 1000 + t
    # Alg. 2, line 2: K samples per prompt from pi_t
    out = sample_split(cfg, policy_dir(R, t), rows, cfg.num_samples, seed, cfg.temperature, R["device"])
    if rank() == 0:
        n = sum(len(o["samples"]) for o in out)
        commit(cfg, path, {"samples.jsonl": out}, manifest("samples", t, {"sample": seed},
               {"policy": policy_dir(R, t), "prompts": R["prompts"]}, {"prompts": len(rows), "samples": n,
               "skipped_long_prompts": R["skipped"]}))


def stage_judgments(cfg, R, t, path):
    rows = {r["id"]: r for r in R["slices"][t - 1]}
    samples = read_jsonl(stage_path(R, t, "samples", "samples.jsonl"))
    items = [{"id": f"train{t}:{s['id']}", "prompt": oracle.prompt_text(rows[s["id"]]["prompt"]),
              "candidates": [x["text"] for x in s["samples"]] + [g for g in [rows[s["id"]]["gold"]] if g]}
             for s in samples]                                  # K samples + gold as the last column
    results = judge(R, items)                                   # Alg. 2, line 3
    commit(cfg, path, {"judgments.jsonl": results}, manifest("judgments", t, {}, {
        "samples": stage_path(R, t, "samples", "samples.jsonl")}, {"items": len(items),
        "ok": sum(r["ok"] for r in results)}))


def stage_pairs(cfg, R, t, path):
    rows, tok, ctx = {r["id"]: r for r in R["slices"][t - 1]}, R["tok"], R["context"]
    samples = read_jsonl(stage_path(R, t, "samples", "samples.jsonl"))
    judged = read_jsonl(stage_path(R, t, "judgments", "judgments.jsonl"))
    current = []
    for s, res in zip(samples, judged):
        if not res["ok"]:
            continue                                            # a failed judgment is never turned into a pair
        row = rows[s["id"]]
        cands = s["samples"] + ([row["gold"]] if row["gold"] else [])
        texts = [c if isinstance(c, str) else c["text"] for c in cands]
        gold = len(cands) - 1 if row["gold"] else None
        for p in dno.select_pairs(res["scores"], gold, [dno.is_defective(x) for x in texts],
                                  kind=res["score_kind"]):   # Alg. 2, line 4 (departure 3)
            current.append({"id": s["id"], "iter": t, "prompt_tokens": row["prompt_tokens"], **p,
                            "chosen_tokens": response_tokens(tok, row, cands[p["chosen"]], ctx),
                            "rejected_tokens": response_tokens(tok, row, cands[p["rejected"]], ctx)})
    previous = [[p for p in read_jsonl(stage_path(R, s, "pairs", "pairs.jsonl")) if p["iter"] == s]
                for s in range(t - 1, 0, -1)]                   # previous[0] is iteration t-1
    shares = [float(x) for x in cfg.replay.split(",") if x.strip()]
    pairs = dno.replay(current, previous, seed=cfg.seed * 1000 + t, shares=shares)
    ok = sum(r["ok"] for r in judged)
    if not pairs:
        raise ValueError(f"iteration {t}: no pairs survived selection ({ok}/{len(judged)} prompts judged ok); "
                         f"nothing to train on - inspect {stage_path(R, t, 'judgments')} or change the judge")
    prov = {k: sum(p["provenance"] == k for p in current) for k in ("gold>sample", "sample>gold",
                                                                     "sample>sample", "defect")}
    prov["replay"] = len(pairs) - len(current)
    print0(f"pairs: {len(pairs)} ({prov}) from {ok}/{len(judged)} judged prompts")
    commit(cfg, path, {"pairs.jsonl": pairs}, manifest("pairs", t, {"replay": cfg.seed * 1000 + t}, {
        "judgments": stage_path(R, t, "judgments", "judgments.jsonl")}, {"pairs": len(pairs), "provenance": prov,
        "judged_ok": ok, "judged": len(judged)}))


def pair_len(p):
    """Padded length of a pair's two sequences (chosen and rejected share one right-padded batch)."""
    return len(p["prompt_tokens"]) + max(len(p["chosen_tokens"]), len(p["rejected_tokens"]))


@torch.no_grad()
def stage_reference(cfg, R, t, path):
    """log pi_t(y+|x), log pi_t(y-|x) computed once, stored with the pairs: training holds one model."""
    pairs = read_jsonl(stage_path(R, t, "pairs", "pairs.jsonl"))
    model, _ = load_policy(policy_dir(R, t), R["device"])
    mine, got = list(range(len(pairs)))[rank()::world()], []
    mine.sort(key=lambda i: pair_len(pairs[i]))                 # similar lengths share a batch: little padding
    for k in range(0, len(mine), cfg.micro_batch):
        chunk = [pairs[i] for i in mine[k:k + cfg.micro_batch]]
        seqs = [(p["prompt_tokens"], p[f"{side}_tokens"]) for side in ("chosen", "rejected") for p in chunk]
        logp = sequence_batch(model, seqs, R["device"])[0].tolist()   # (2m,)
        got += [(i, logp[j], logp[j + len(chunk)]) for j, i in enumerate(mine[k:k + cfg.micro_batch])]
    if world() > 1:
        parts = [None] * world()
        dist.all_gather_object(parts, got)
        got = [x for p in parts for x in p]
    for i, c, r in got:
        pairs[i].update(ref_chosen=c, ref_rejected=r)
    if rank() == 0:
        commit(cfg, path, {"pairs.jsonl": pairs}, manifest("reference", t, {}, {
            "policy": policy_dir(R, t), "pairs": stage_path(R, t, "pairs", "pairs.jsonl")}, {"pairs": len(pairs)}))


def for_training(model, cfg, device):
    """Activation checkpointing (optional), then under torchrun FSDP2: each block, then the root; bf16 compute
    with fp32 reductions on GPU. Parameter names are unchanged, so the state dict saves as is."""
    model.train()
    if cfg.grad_ckpt:
        from torch.distributed._composable import checkpoint
        for block in model.layers:
            checkpoint(block)
    if world() > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" else MixedPrecisionPolicy())
        for block in model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model


def train_step(model, opt, pairs, batch, cfg, device):
    """One optimizer step on a global batch of pairs (Alg. 2, line 5); each rank takes batch[rank::world] in
    micro-batches (gradient accumulation). -> float64 tensor [loss sum, margin sum, accuracy sum, pairs, tokens]."""
    # the step's gradient is a sum over the batch, so its order is free: sort by length, micro-batches pad little
    batch = sorted(batch, key=lambda i: pair_len(pairs[i]))
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
        seqs = [(p["prompt_tokens"], p[f"{side}_tokens"]) for side in ("chosen", "rejected") for p in P]
        logp, ntok = sequence_batch(model, seqs, device)        # (2m,) log pi(y|x), summed over tokens
        ref = torch.tensor([[p["ref_chosen"], p["ref_rejected"]] for p in P], device=device)   # (m, 2) pi_t
        losses, st = dno.dno_loss(logp[:m], logp[m:], ref[:, 0], ref[:, 1], target=1.0, eta=cfg.eta)  # (m,)
        # the mean over the global batch; FSDP averages gradients over ranks, hence * world
        (losses.sum() * (weight * world() / len(batch))).backward()
        acc += weight * torch.tensor([losses.sum().item(), st["margin"].item() * m, st["accuracy"].item() * m, m,
                                      ntok], dtype=torch.float64)
    if world() > 1:                                             # nccl reduces device tensors only
        acc = acc.to(device)
        dist.all_reduce(acc)
        acc = acc.cpu()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return acc


def stage_checkpoint(cfg, R, t, path):
    """Alg. 2, line 5: train pi_{t+1} from pi_t on the pairs with the DNO loss (target 1, reference pi_t)."""
    from tqdm import tqdm
    pairs, device = read_jsonl(stage_path(R, t, "reference", "pairs.jsonl")), R["device"]
    model, tok = load_policy(policy_dir(R, t), device)
    for_training(model, cfg, device)
    lr_t = cfg.lr * cfg.lr_decay ** (t - 1)                     # departure 4: lower lr in later iterations
    opt = torch.optim.AdamW(model.parameters(), lr=lr_t, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + t)
    order = torch.cat([torch.randperm(len(pairs), generator=g) for _ in range(math.ceil(cfg.epochs))]).tolist()
    order = order[:max(1, round(len(pairs) * cfg.epochs))]
    steps = math.ceil(len(order) / cfg.batch_size)
    steps = min(steps, cfg.max_steps) if cfg.max_steps else steps
    warm, log = max(1, round(cfg.warmup * steps)), []
    for step in tqdm(range(steps), disable=rank() != 0, desc=f"train iter {t}", file=sys.stderr):
        t0, frac = time.time(), (step + 1 - warm) / max(1, steps - warm)
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1 - frac
        lr = lr_t * ((step + 1) / warm if step < warm else decay)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]   # the global batch
        acc = train_step(model, opt, pairs, batch, cfg, device)
        rec = {"step": step + 1, "loss": acc[0].item() / acc[3].item(), "margin": acc[1].item() / acc[3].item(),
               "acc": acc[2].item() / acc[3].item(), "lr": lr}
        log.append(rec)
        if rank() == 0:
            tqdm.write(f"step {rec['step']} | loss {rec['loss']:.4f} | margin {rec['margin']:.4f} | "
                       f"acc {rec['acc']:.3f} | lr {lr:.3e} | tok/s {acc[4].item() / (time.time() - t0):.0f}")
    sd = None
    if world() > 1:                                             # gather the full state dict on rank 0 (CPU)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() == 0:
        commit(cfg, path, {"train_log.jsonl": log}, manifest("checkpoint", t, {"order": cfg.seed * 1000 + t}, {
            "policy": policy_dir(R, t), "pairs": stage_path(R, t, "reference", "pairs.jsonl")}, {
            "pairs": len(pairs), "steps": steps, "lr": lr_t}),
            save=lambda d: model.save_pretrained(d, tokenizer=tok, state_dict=sd))


def stage_eval(cfg, R, t, path):
    """pi_{t+1} (pi_1 for t = 0) on the validation prompts: vs pi_1 and vs gold, both orders, same oracle."""
    val, policy = R["val"], R["model"] if t == 0 else stage_path(R, t, "checkpoint")
    seed = cfg.seed * 1000 + 999
    outs = sample_split(cfg, policy, val, 1, seed, cfg.eval_temperature, R["device"])
    on_rank0(judge_eval, cfg, R, t, path, outs, policy, seed)


def judge_eval(cfg, R, t, path, outs, policy, seed):
    val, new = R["val"], [o["samples"][0] for o in outs]
    gold = [(r["gold"], len(R["tok"].encode(r["gold"], add_special_tokens=False))) if r["gold"] else None for r in val]
    opponents = {"gold": gold}
    if t > 0:                                                   # pi_1's validation samples, from iteration 0
        opponents["init"] = [(o["samples"][0]["text"], len(o["samples"][0]["tokens"]))
                             for o in read_jsonl(stage_path(R, 0, "eval", "samples.jsonl"))]
    items, lens = {k: [] for k in opponents}, {k: [] for k in opponents}
    for k, opp in opponents.items():
        for r, a, b in [(r, a, b) for r, a, b in zip(val, new, opp) if b is not None]:
            items[k] += [{"id": f"eval{t}:{r['id']}:{k}:{o}", "prompt": oracle.prompt_text(r["prompt"]),
                          "candidates": c} for o, c in (("ab", [a["text"], b[0]]), ("ba", [b[0], a["text"]]))]
            lens[k].append(len(a["tokens"]) - b[1])
    judged = judge(R, [x for k in items for x in items[k]])
    m, audit, i = {"iter": t, "model": os.path.relpath(policy, R["out"]) if t else policy}, dict.fromkeys(
        ("n", "failed", "ties", "disagree", "both"), 0), 0
    for k in opponents:
        m[f"winrate_vs_{k}"], m[f"lc_winrate_vs_{k}"] = compare(judged[i:i + len(items[k])], lens[k], audit)
        i += len(items[k])
    if t == 0:
        m["winrate_vs_init"] = m["lc_winrate_vs_init"] = 0.5     # pi_1 against itself, by definition
    pm = json.load(open(stage_path(R, t, "pairs", "manifest.json")))["counts"] if t else {}
    m.update(mean_length=float(np.mean([len(a["tokens"]) for a in new])), num_pairs=pm.get("pairs", 0),
             provenance=pm.get("provenance", {}), judge_audit={
                 "order_disagreement": audit["disagree"] / audit["both"] if audit["both"] else None,
                 "tie_rate": audit["ties"] / max(1, audit["n"] - audit["failed"]),
                 "failure_rate": audit["failed"] / max(1, audit["n"])},
             train_judge_failure_rate=1 - pm["judged_ok"] / max(1, pm["judged"]) if t else None)
    commit(cfg, path, {"samples.jsonl": outs, "judgments.jsonl": judged, "metrics.json": m},
           manifest("eval", t, {"sample": seed}, {"policy": policy}, {"prompts": len(val)}))


# ----------------------------------------------------------------------------- report
def summarize(cfg, R, final=False):
    """metrics.jsonl (one line per finished iteration), best.json, metrics.png; the table at the end."""
    rows = [json.load(open(stage_path(R, t, "eval", "metrics.json"))) for t in range(cfg.iterations + 1)
            if os.path.exists(stage_path(R, t, "eval", "done"))]
    write_atomic(os.path.join(R["out"], "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    key = "winrate_vs_gold" if any(r["winrate_vs_gold"] is not None for r in rows) else "winrate_vs_init"
    best = max(rows, key=lambda r: -1 if r[key] is None else r[key])   # Alg. 2, output: the best iterate
    write_atomic(os.path.join(R["out"], "best.json"), json.dumps(
        {"iter": best["iter"], "model": best["model"], "by": f"{key} on validation", key: best[key]}, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    for k in ("winrate_vs_init", "winrate_vs_gold", "lc_winrate_vs_gold"):
        a.plot([r["iter"] for r in rows], [np.nan if r[k] is None else r[k] for r in rows], marker="o", label=k)
    b.plot([r["iter"] for r in rows], [r["mean_length"] for r in rows], marker="o")
    a.set(xlabel="iteration", title="validation win-rate"), b.set(xlabel="iteration", title="mean length (tokens)")
    a.legend(fontsize=7)
    for ax in (a, b):
        ax.set_xticks([r["iter"] for r in rows])
    fig.tight_layout()
    fig.savefig(os.path.join(R["out"], "metrics.tmp.png"), dpi=100)
    plt.close(fig)
    os.replace(os.path.join(R["out"], "metrics.tmp.png"), os.path.join(R["out"], "metrics.png"))
    if final:
        fmt = lambda v: "   -  " if v is None else f"{v:6.3f}"
        print0("iter | vs_init | vs_gold | lc_vs_gold | mean_len | pairs")
        for r in rows:
            print0(f"{r['iter']:4d} |  {fmt(r['winrate_vs_init'])} |  {fmt(r['winrate_vs_gold'])} |     "
                   f"{fmt(r['lc_winrate_vs_gold'])} | {r['mean_length']:8.1f} | {r['num_pairs']:5d}"
                   + ("   <- best" if r is best else ""))
        print0(f"best iterate: iter {best['iter']} ({best['model']}) by {key}")


# ----------------------------------------------------------------------------- setup and the loop
def make_judge(cfg, out):
    """-> (oracle.Config, fn): a named synthetic judge function, module:function, or an oracle.py judge."""
    ocfg = oracle.Config(judge=cfg.judge, base_url=cfg.base_url, model=cfg.judge_model, api_key_env=cfg.api_key_env,
                         concurrency=cfg.concurrency, max_usd=cfg.max_usd, max_calls=cfg.max_calls,
                         cache=os.path.join(out, "judge_cache.jsonl"), seed=cfg.seed)
    if cfg.judge in ("rubric", "pairwise"):
        oracle.make_client(ocfg)                                # fail fast on a missing API key, before sampling
        return ocfg, None
    if cfg.judge == "local":
        ocfg.local_model = cfg.judge_model
        return ocfg, None
    if ":" in cfg.judge:                                        # your own fn(prompt, candidates), e.g. mymod:judge
        import importlib
        mod, name = cfg.judge.split(":", 1)
        fn = getattr(importlib.import_module(mod), name)
    else:
        import demo_task
        fn = {**oracle.SYNTHETIC, **demo_task.JUDGES}.get(cfg.judge)
        if fn is None:
            raise ValueError(f"unknown --judge {cfg.judge!r}: use rubric, pairwise, local, module:function or one "
                             f"of {sorted({**oracle.SYNTHETIC, **demo_task.JUDGES})}")
    ocfg.judge = "synthetic"
    return ocfg, fn


def setup(cfg):
    """Device and process group: nccl on GPU / gloo on CPU under torchrun (WORLD_SIZE > 1), else one process."""
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=12))  # rank 0 judges for long
    return device


def demo_inputs(cfg):
    """--model "" / --prompts "": the built-in demo task, prepared once in OUT/demo (prepare is cached)."""
    import demo_task
    if rank() == 0:
        demo_task.prepare(os.path.join(cfg.out, "demo"), cfg.seed, log=print0)
    barrier()                                                   # then every rank reuses what rank 0 built
    model, prompts = demo_task.prepare(os.path.join(cfg.out, "demo"), cfg.seed, log=lambda *a: None)
    return cfg.model or model, cfg.prompts or prompts


def run(cfg):
    device = setup(cfg)
    print0("config: " + json.dumps(asdict(cfg)))
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.rollback >= 0 and rank() == 0:                       # --rollback t: discard iterations > t
        for name in os.listdir(cfg.out):
            if name.startswith("iter_") and name[5:].isdigit() and int(name[5:]) > cfg.rollback:
                print0(f"rollback: removing {name}")
                shutil.rmtree(os.path.join(cfg.out, name))
    barrier()
    model, prompts = (cfg.model, cfg.prompts) if cfg.model and cfg.prompts else demo_inputs(cfg)
    from transformers import AutoTokenizer
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise FileNotFoundError(f"--model {model}: no config.json (expected a Hugging Face model folder)")
    tok = AutoTokenizer.from_pretrained(model)
    context = json.load(open(os.path.join(model, "config.json")))["max_position_embeddings"]
    rows, skipped = load_prompts(prompts, tok, context - cfg.max_new_tokens - 1)
    print0(f"prompts: {len(rows)} usable, {skipped} skipped (prompt + max_new_tokens longer than {context})")
    val, slices = split(rows, cfg)                              # Alg. 2, line 1: disjoint slices + validation
    ocfg, fn = make_judge(cfg, cfg.out)
    R = dict(out=cfg.out, model=model, prompts=prompts, tok=tok, context=context, val=val, slices=slices,
             skipped=skipped, device=device, ocfg=ocfg, fn=fn)
    fns = {"samples": stage_samples, "judgments": stage_judgments, "pairs": stage_pairs,
           "reference": stage_reference, "checkpoint": stage_checkpoint, "eval": stage_eval}
    rank0_only = ("judgments", "pairs")
    for t in range(cfg.iterations + 1):                         # Alg. 2, line 1: for t = 1..T (t = 0: pi_1 only)
        for stage in STAGES if t else ["eval"]:
            path = stage_path(R, t, stage)
            if os.path.exists(os.path.join(path, "done")):
                continue                                        # resume at the first unfinished stage
            print0(f"iter {t} | {stage}: start")
            if stage in rank0_only:
                on_rank0(fns[stage], cfg, R, t, path)
            else:
                fns[stage](cfg, R, t, path)
            barrier()
        on_rank0(summarize, cfg, R, t == cfg.iterations)
    if world() > 1:
        dist.destroy_process_group()


def main(argv=None):
    cfg = cli(Config, argv)
    try:
        run(cfg)
    except (ValueError, OSError, oracle.BudgetExceeded) as e:    # user mistakes and budget stops: one line
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()

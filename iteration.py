"""iteration.py: the six stages of DNO iteration t (Algorithm 2, lines 4-9) -- samples, judgments,
pairs, reference, checkpoint, eval -- each declared up front by what it reads (STAGES). train.py's
`dno_prct` calls them in order.

    python iteration.py          # demo: the built-in task's iteration 1, stage by stage (CPU)

A stage is the folder OUT/iter_t/<name>/ (stages.py). `todo` hashes the inputs a stage declares and
records the Config fields it declares; a finished stage made from the same is reused, any other is
refused in one line. Sampling and reference log-probs are split across ranks; rank 0 judges and
writes (distributed.py).

Departures from the paper (numbered):
    1. Each response ends with the token that ended it (the sampler records it; for the gold: eos
       for a text prompt, <|im_end|> for a chat prompt when the tokenizer has it), scored in the
       log-probs (`response_tokens`).
    2. "Rank by win-rate" (line 5): r_t(y) is y's win-rate among the K+1 candidates (dno.winrates of
       the judge's table; rubric scores give a 1/0.5/0 table). --pairs margin keeps the paper's
       large-margin pairs (dno.select_pairs); --pairs all keeps every candidate pair (`make_pairs`);
       restrictive and spin are Table 1's ablations (dno.py, departure 8; spin never asks the judge).
    3. Line 7's optimizer: AdamW, linear warmup, then cosine (or linear) decay to 0, <= --epochs
       passes; lr_t = lr * lr_decay**(t-1) (the paper lowers the rate later without saying how).
    4. Line 7 runs on our own trainer (`optimize` / `train_step`), not TRL's DPO code as the paper
       did; with target 1 the loss is DPO's with reference pi_t (tests/test_dno.py:
       test_soft_target_is_label_smoothed_dpo checks dno_loss against DPO's formula).
"""
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError

import dno
import evaluate
import oracle
import sample
from dnolib import lora, stages, tracking, vllm_sampler
from dnolib.distributed import barrier, for_training, full_state_dict, gather, on_rank0, print0, rank
from dnolib.distributed import sum_over_ranks, world
from dnolib.model import Transformer
from dnolib.model_io import load_tokenizer
from dnolib.stages import StageError, read_jsonl
from sample import generate


# ------------------------------------------------------------------------ what each stage reads
class Reads(NamedTuple):
    inputs: tuple       # what the stage reads, each hashed (bytes or records) into its manifest
    flags: tuple        # the Config fields that shape its files, each recorded by value


# Declared up front: `todo` records exactly these and a resume reuses a stage only when all match (a
# flag an old manifest lacks is a mismatch, unless ADDED names the value that reproduces the code
# before it). Every train.Config field is a flag here, a file read as an input (train.INPUT_FIELDS)
# or in train.NO_ARTIFACT: tests/test_run_folder.py walks the fields.
JUDGE = ("judge", "judge_model", "base_url", "judge_context", "judge_params", "seed")  # P's answers
SAMPLING = ("max_new_tokens", "top_p", "seed", "sampler")
TRAINING = ("target", "eta", "lr", "lr_decay", "warmup", "schedule", "batch_size", "epochs",
            "max_steps", "weight_decay", "grad_clip", "seed", "lora_rank", "lora_alpha",
            "micro_batch")   # micro_batch: the summation order of the accumulated gradient
# ADDED: flags newer than some finished stages, with the value that reproduces the code before them.
# micro_batch is not one: stages made before it was recorded may have used any value (--rollback).
ADDED = {"judge_params": ""}
STAGES = {
    "samples": Reads(("policy", "prompts"),
                     ("prompts_per_iter", "num_val", "num_samples", "temperature") + SAMPLING),
    "judgments": Reads(("prompts", "samples"), JUDGE + ("position_audit", "gold")),
    "pairs": Reads(("prompts", "samples", "judgments", "earlier_pairs"),
                   ("pairs", "opponents", "replay", "seed")),
    "reference": Reads(("policy", "pairs"), ("precision", "ref_mix", "optimistic", "micro_batch")),
    "checkpoint": Reads(("policy", "pairs"), ("precision",) + TRAINING),
    "eval": Reads(("policy", "val", "init"), ("num_val", "eval_temperature") + SAMPLING + JUDGE),
}


@dataclass
class Run:
    """What every stage reads: the config, pi_1, the prompts split into D_1..D_T and validation."""
    cfg: object                     # train.Config
    out: str                        # the run folder
    pi_1: str                       # the initial policy's folder
    tok: object                     # its tokenizer (every iterate shares it)
    context: int                    # the policy's context length, in tokens
    val: list                       # validation rows {"id", "prompt", "gold", "prompt_tokens"}
    slices: list                    # D_1..D_T, lists of prompt rows
    skipped: int                    # over-long prompts skipped (train.py, departure 1)
    device: torch.device
    judge: oracle.Config            # the preference oracle P (with the run-wide cache and ledger)
    fn: object = None               # a Python judge function, when --judge names one
    amp: object = False             # autocast dtype of training and log-probs: bf16 or False
    tracker: object = tracking.NullTracker()   # --report_to (dnolib/tracking.py); rank 0 only


# ------------------------------------------------------------------------ candidates and policies
def response_tokens(tok, row, cand, context):
    """Token ids of a candidate (a sample dict or the gold string) with the token that ended it
    (departure 1), cut to the context left after the prompt."""
    if isinstance(cand, str):
        end = tok.eos_token_id
        if isinstance(row["prompt"], list) and "<|im_end|>" in tok.get_vocab():
            end = tok.convert_tokens_to_ids("<|im_end|>")
        ids = tok.encode(cand, add_special_tokens=False) + [end]
    else:
        ids = list(cand["tokens"])
        if cand.get("stop_token") is not None:
            ids.append(cand["stop_token"])
    return ids[:max(1, context - len(row["prompt_tokens"]))]


def candidates(row, sample):
    """The K+1 candidates of line 5: pi_t's K samples, then the gold response (if any) last."""
    return sample["samples"] + ([row["gold"]] if row["gold"] else [])


def texts(cands):
    return [c if isinstance(c, str) else c["text"] for c in cands]


def load_policy(path, device):
    return Transformer.from_pretrained(path, device=device), load_tokenizer(path)


def policy_dir(run, t):
    """pi_t: the initial policy for t = 1, else the checkpoint trained in iteration t-1."""
    if t <= 1:
        return run.pi_1
    return stages.stage_dir(run.out, t - 1, "checkpoint")


def sample_split(run, policy, rows, k, seed, temperature, where):
    """k samples per prompt from a policy; prompts split across ranks, gathered in order. where:
    (t, the stage's name)."""
    if run.cfg.sampler == "vllm":                       # a vLLM child on the policy's folder
        return vllm_sampler.sample_split(run, policy, rows, k, seed, temperature, sample)
    model, tok = load_policy(policy, run.device)
    mine = rows[rank()::world()]
    prompts, cap = [r["prompt"] for r in mine], run.cfg.max_new_tokens
    # --sample_rows 0: what fits the memory now, chosen once per stage and kept, so a rerun of an
    # unfinished stage draws the same samples whatever is free then (rounding depends on the rows)
    longest = lambda: max((len(sample.encode_prompt(tok, p)) for p in prompts), default=1)
    fits = lambda: sample.default_rows(model, longest(), cap)
    pin = os.path.join(run.out, f"iter_{where[0]}", f"{where[1]}.rows.{rank()}.json")
    outs = generate(model, tok, prompts, num_samples=k, ids=[r["id"] for r in mine],
                    max_new_tokens=cap, temperature=temperature, top_p=run.cfg.top_p, seed=seed,
                    rows=run.cfg.sample_rows or stages.pinned(pin, fits), progress=rank() == 0)
    by_id = dict(gather([(r["id"], o) for r, o in zip(mine, outs)]))
    return [{"id": r["id"], "samples": by_id[r["id"]]} for r in rows]


# ------------------------------------------------------------------------ one stage
def todo(run, t, name, **inputs):
    """-> (OUT/iter_t/<name>, shape): shape is None when the stage is done from these inputs and
    its declared flags (STAGES); else the shape to record, its .tmp folder made ready (rank 0)."""
    reads = STAGES[name]
    if set(inputs) != set(reads.inputs):
        raise TypeError(f"stage {name} declares {reads.inputs}, was given {tuple(inputs)}")
    want = stages.shape(inputs, {f: getattr(run.cfg, f) for f in reads.flags})
    path = stages.stage_dir(run.out, t, name)
    if stages.is_done(run.out, t, name, want, ADDED):
        return path, None
    print0(f"iter {t} | {name}: start")
    if rank() == 0:
        stages.start(run.out, t, name)
    return path, want


def commit(run, t, name, want, files, counts):
    manifest = {"shape": want, "counts": counts}
    stages.commit(run.out, t, name, files, manifest, run.cfg, run.cfg.stage_pause)


# ------------------------------------------------------------------------ the stages of iteration t
def sample_step(run, t, D_t):
    """Line 4: K samples per prompt of D_t from pi_t."""
    policy = policy_dir(run, t)
    path, want = todo(run, t, "samples", policy=policy, prompts=D_t)
    if want is None:
        return path
    seed = run.cfg.seed * 1000 + t
    out = sample_split(run, policy, D_t, run.cfg.num_samples, seed, run.cfg.temperature,
                       (t, "samples"))
    if rank() == 0:
        n = sum(len(o["samples"]) for o in out)
        counts = {"prompts": len(D_t), "skipped_long_prompts": run.skipped, "samples": n}
        commit(run, t, "samples", want, {"samples.jsonl": out}, counts)
    barrier()
    return path


def judge_step(run, t, D_t, samples):
    """Line 5: the oracle judges the K+1 candidates of each prompt (shuffled, cached, budgeted)."""
    if run.cfg.pairs == "spin":                         # SPIN has no annotation: nothing is paid
        return None
    path, want = todo(run, t, "judgments", prompts=D_t, samples=samples)
    if want is not None:
        on_rank0(judge_samples, run, t, D_t, samples, want)
        barrier()
    return path


def judge_samples(run, t, D_t, samples, want):
    rows = {r["id"]: r for r in D_t}
    prefix = f"train{t}:"
    items = []
    for s in read_jsonl(os.path.join(samples, "samples.jsonl")):
        row = rows[s["id"]]
        gold = len(s["samples"]) if row["gold"] else None
        items.append({"id": prefix + s["id"], "prompt": row["prompt"],
                      "candidates": texts(candidates(row, s)), "gold_index": gold})
    results, summary = oracle.ask(run, items, f"iter {t} judgments")
    judged = [{**r, "id": s["id"][len(prefix):]} for r, s in zip(results, items)]
    audit = {k: summary.get(k) for k in ("order_disagreement", "position", "truncated")}
    counts = {"items": len(items), "ok": sum(r["ok"] for r in results), "judge": audit}
    commit(run, t, "judgments", want, {"judgments.jsonl": judged}, counts)


def pairs_step(run, t, D_t, samples, judgments):
    """Lines 5-6: rank the K+1 candidates by win-rate r_t, keep (y+, y-) pairs, plus replay."""
    earlier = [stages.stage_dir(run.out, u, "pairs", "pairs.jsonl") for u in range(1, t)]
    path, want = todo(run, t, "pairs", prompts=D_t, samples=samples, judgments=judgments,
                      earlier_pairs=[stages.sha(f) for f in earlier])
    if want is not None:
        on_rank0(make_pairs, run, t, D_t, samples, judgments, earlier, want)
        barrier()
    return path


def make_pairs(run, t, D_t, samples, judgments, earlier, want):
    rows = {r["id"]: r for r in D_t}
    spin = judgments is None                            # --pairs spin: no judge (judge_step)
    judged = {} if spin else {j["id"]: j for j in read_jsonl(os.path.join(judgments,
                                                                          "judgments.jsonl"))}
    current, tables, teacher, seen = [], [], [], []
    for s in read_jsonl(os.path.join(samples, "samples.jsonl")):   # joined by id, not position
        row, res = rows.get(s["id"]), judged.get(s["id"])
        if row is None or (res is None and not spin):
            raise StageError(f"{samples}: prompt id {s['id']!r} has no prompt row or no judgment")
        seen.append((texts(s["samples"]), res, bool(row["gold"])))   # Table 2's columns
        if spin:
            current += prompt_pairs(run, t, row, s, None, None)
            continue
        if not res["ok"]:
            continue                                    # a failed judgment never becomes a pair
        vs = None                                       # r_t among all K+1 candidates
        if run.cfg.opponents == "samples":
            vs = range(len(s["samples"]))               # ... or against pi_t's K samples only
        r_t = dno.winrates(res["P"], vs)                # (K+1,) r_t(y)
        tables.append(res["P"])
        if row["gold"]:
            gold = len(s["samples"])
            teacher.append((r_t[gold], res["scores"][gold]))
        current += prompt_pairs(run, t, row, s, res, r_t)
    old = [[p for p in read_jsonl(f) if p["iter"] == u] for u, f in enumerate(earlier, 1)]
    old = old[::-1]                                     # t-1 first
    shares = dno.replay_shares(run.cfg.replay, len(old))
    pairs = dno.replay(current, old, seed=run.cfg.seed * 1000 + t, shares=shares)
    if not pairs:
        raise ValueError(f"iteration {t}: no pairs survived selection ({len(tables)}/{len(judged)} "
                         f"prompts judged ok); nothing to train on - inspect {judgments} or change "
                         "the judge")
    prov = {k: sum(p["provenance"] == k for p in current) for k in dno.PROVENANCE}
    prov["replay"] = len(pairs) - len(current)
    print0(f"pairs: {len(pairs)} ({prov}) from {len(tables)}/{len(judged)} judged prompts")
    counts = {"table2": evaluate.annotation_stats(seen, prov),     # the paper's Table 2, one row
              "pairs": len(pairs), "provenance": prov, "judged_ok": len(tables),
              "judged": len(judged),
              "preferences": evaluate.diagnostics(tables),   # cycles, BT vs Copeland ranking
              "teacher_winrate": float(np.mean([w for w, _ in teacher])) if teacher else None,
              "teacher_score": float(np.mean([s for _, s in teacher])) if teacher else None}
    commit(run, t, "pairs", want, {"pairs.jsonl": pairs}, counts)


def prompt_pairs(run, t, row, s, res, r_t):
    """Line 6 for one prompt (departure 2): its (y+, y-) pairs, both sides' tokens and r_t."""
    cands = candidates(row, s)
    gold = len(s["samples"]) if row["gold"] else None
    bad = [dno.is_defective(x) for x in texts(cands)]
    if run.cfg.pairs == "margin":                       # line 6; win-rates: r_t (--opponents)
        scores = r_t if res["score_kind"] == "winrate" else res["scores"]
        chosen = dno.select_pairs(scores, gold, bad, kind=res["score_kind"])
    elif run.cfg.pairs == "restrictive":                # DNO-Restrictive: the gold the y+ (Table 1)
        chosen = dno.teacher_pairs(res["P"], gold, bad)
    elif run.cfg.pairs == "spin":                       # SPIN: gold y+, every sample y-, no judge
        chosen = dno.spin_pairs(len(cands), gold)
    else:
        chosen = dno.all_pairs(r_t, bad, gold)          # Alg. 1's mu: every candidate pair
    out = []
    for p in chosen:
        y_plus, y_minus = cands[p["chosen"]], cands[p["rejected"]]
        r_pair = (1.0, 0.0) if r_t is None else (r_t[p["chosen"]], r_t[p["rejected"]])   # SPIN
        out.append({"id": s["id"], "iter": t, "prompt_tokens": row["prompt_tokens"], **p,
                    "r_chosen": float(r_pair[0]), "r_rejected": float(r_pair[1]),
                    "chosen_tokens": response_tokens(run.tok, row, y_plus, run.context),
                    "rejected_tokens": response_tokens(run.tok, row, y_minus, run.context)})
    return out


def reference_step(run, t, pairs):
    """Line 7's reference log pi_t(y+|x), log pi_t(y-|x), once, stored with the pairs (so training
    holds one model). --ref_mix beta > 0: the smoothed reference (1 - beta) log pi_t + beta log pi_1
    (extension 1, dno.geometric_reference)."""
    policy = policy_dir(run, t)
    path, want = todo(run, t, "reference", policy=policy, pairs=pairs)
    if want is None:
        return path
    P = read_jsonl(os.path.join(pairs, "pairs.jsonl"))
    for i, c, r in gather(reference_logps(run, policy, P, t)):
        P[i].update(ref_chosen=c, ref_rejected=r)
    if rank() == 0:
        commit(run, t, "reference", want, {"pairs.jsonl": P}, {"pairs": len(P)})
    barrier()
    return path


@torch.no_grad()
def reference_logps(run, policy, P, t=1):
    """This rank's share of the pairs -> [(index, log ref(y+|x), log ref(y-|x))], ref = pi_t, the
    geometric mixture of pi_t and pi_1 (--ref_mix), of the past iterates (--optimistic), or of
    that mixture and pi_1 (both)."""
    model, _ = load_policy(policy, run.device)
    init = load_policy(run.pi_1, run.device)[0] if run.cfg.ref_mix > 0 else None
    mine = sorted(range(len(P))[rank()::world()], key=lambda i: pair_len(P[i]))   # little padding
    mb, beta = run.cfg.micro_batch, run.cfg.ref_mix
    got, anchor = [], {}
    for k in range(0, len(mine), mb):
        idx = mine[k:k + mb]
        c, r, _ = dno.pair_logps(model, [P[i] for i in idx], run.device, run.amp)   # (m,) pi_t
        if init is not None:                            # (m,) log pi_1, then the geometric mixture
            c1, r1, _ = dno.pair_logps(init, [P[i] for i in idx], run.device, run.amp)
            if run.cfg.optimistic:                      # mixed in after extension 2's mixture
                anchor.update(zip(idx, zip(c1.tolist(), r1.tolist())))
            else:
                c, r = dno.geometric_reference(c, c1, beta), dno.geometric_reference(r, r1, beta)
        got += list(zip(idx, c.tolist(), r.tolist()))
    if run.cfg.optimistic:                              # extension 2: past iterates, halving
        got = optimistic_logps(run, P, got, t)
    if anchor:                                          # both: (1 - beta) mixture + beta log pi_1
        mix = lambda a, b: float(dno.geometric_reference(torch.tensor(a), torch.tensor(b), beta))
        got = [(i, mix(c, anchor[i][0]), mix(r, anchor[i][1])) for i, c, r in got]
    return got


@torch.no_grad()
def optimistic_logps(run, P, got, t):
    """--optimistic N: the reference of dno.optimistic_reference over pi_t, pi_{t-1}, ..., pi_{t-N+1}
    (got holds log pi_t). -> got with the mixture in place of log pi_t."""
    past = [policy_dir(run, u) for u in range(t - 1, max(0, t - run.cfg.optimistic), -1)]
    rows = [(i, [c], [r]) for i, c, r in got]
    for path in past:                                   # pi_{t-1}, pi_{t-2}, ... (newest first)
        model, _ = load_policy(path, run.device)
        for k in range(0, len(rows), run.cfg.micro_batch):
            part = rows[k:k + run.cfg.micro_batch]
            c, r, _ = dno.pair_logps(model, [P[i] for i, _, _ in part], run.device, run.amp)
            for (_, cs, rs), ci, ri in zip(part, c.tolist(), r.tolist()):
                cs.append(ci)
                rs.append(ri)
    mix = lambda xs: float(dno.optimistic_reference([torch.tensor(x) for x in xs]))
    return [(i, mix(cs), mix(rs)) for i, cs, rs in rows]


def train_pi(run, t, pairs):
    """Line 7: pi_{t+1} = argmax of the contrastive objective on the pairs, reference pi_t."""
    policy = policy_dir(run, t)
    path, want = todo(run, t, "checkpoint", policy=policy, pairs=pairs)
    if want is None:
        return path
    model, tok = load_policy(policy, run.device)
    if run.cfg.lora_rank:                               # fresh adapters on pi_t, the rest frozen
        lora.add_lora(model, run.cfg.lora_rank, run.cfg.lora_alpha)
    for_training(model, run.cfg.grad_ckpt, bf16=run.amp is torch.bfloat16)   # FSDP2 (torchrun)
    P = read_jsonl(os.path.join(pairs, "pairs.jsonl"))
    log = optimize(model, P, run.cfg, t, run.device, run.amp)
    on_rank0(tracking.log_steps, run.tracker, run.out, t, log)   # --report_to: the step log
    sd = full_state_dict(model)                         # under torchrun: gathered on CPU, else None
    on_rank0(save_checkpoint, run, t, want, model, tok, sd, log)
    barrier()
    return path


def save_checkpoint(run, t, want, model, tok, state_dict, log):
    """pi_{t+1} in the HF layout, then the stage; a full disk is one line and commits nothing."""
    tmp = stages.stage_dir(run.out, t, "checkpoint") + ".tmp"
    try:
        if run.cfg.lora_rank:                           # W + scale B A: a plain HF folder again
            state_dict = lora.merged_state_dict(model, state_dict)
        model.save_pretrained(tmp, tokenizer=tok, state_dict=state_dict)   # in pi_1's stored dtype
    except (OSError, SafetensorError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StageError(f"iter_{t}/checkpoint: cannot save the checkpoint in {tmp} ({why}); "
                         "free disk space, then rerun the same command to resume") from None
    commit(run, t, "checkpoint", want, {"train_log.jsonl": log}, {"steps": len(log)})


def eval_step(run, t):
    """Line 9's data: pi_{t+1} (pi_1 at t = 0) answers the validation prompts, judged vs pi_1 and
    the gold; then the run's report (metrics.jsonl, best.json)."""
    policy = run.pi_1
    init = None
    if t > 0:
        policy = stages.stage_dir(run.out, t, "checkpoint")
        init = stages.stage_dir(run.out, 0, "eval", "samples.jsonl")
    path, want = todo(run, t, "eval", policy=policy, val=run.val, init=init)
    if want is not None:
        seed = run.cfg.seed * 1000 + 999
        outs = sample_split(run, policy, run.val, 1, seed, run.cfg.eval_temperature, (t, "eval"))
        on_rank0(judge_eval, run, t, want, outs)
        barrier()
    final = t == run.cfg.iterations                     # the report reads verified iterations only
    on_rank0(evaluate.report, run.out, run.cfg.select_by, final, t)
    on_rank0(tracking.log_metrics, run.tracker, run.out, t)   # --report_to: metrics.jsonl's row t
    return path


def judge_eval(run, t, want, outs):
    files, counts = evaluate.judge_eval(run, t, outs)
    commit(run, t, "eval", want, files, counts)


# -----------------------------------------------------------------------------
def pair_len(p):
    """Padded length of a pair's two sequences (both sides share one right-padded batch)."""
    return len(p["prompt_tokens"]) + max(len(p["chosen_tokens"]), len(p["rejected_tokens"]))


def train_step(model, opt, pairs, batch, cfg, device, amp=None):
    """One optimizer step on a global batch of pairs; each rank takes batch[rank::world] in
    micro-batches (gradient accumulation).
    -> float64 tensor [loss sum, margin sum, accuracy sum, pairs, tokens]."""
    batch = sorted(batch, key=lambda i: pair_len(pairs[i]))    # a sum: order is free, pad little
    mine = batch[rank()::world()]
    mb = cfg.micro_batch
    n_micro = math.ceil(math.ceil(len(batch) / world()) / mb)
    acc = torch.zeros(5, dtype=torch.float64)
    for k in range(n_micro):
        chunk = mine[k * mb:(k + 1) * mb]
        weight = 1.0
        if not chunk:                           # every rank runs the same passes (FSDP collectives)
            chunk, weight = batch[:1], 0.0
        if world() > 1:
            model.set_requires_gradient_sync(k == n_micro - 1)
        P = [pairs[i] for i in chunk]
        m = len(chunk)
        logp_c, logp_r, ntok = dno.pair_logps(model, P, device, amp)   # (m,) log pi(y+|x), (y-|x)
        ref = [[p["ref_chosen"], p["ref_rejected"]] for p in P]
        ref = torch.tensor(ref, device=device)          # (m, 2) log pi_t
        r = torch.tensor([[p["r_chosen"], p["r_rejected"]] for p in P], device=device)   # (m, 2)
        target = 1.0                                            # Alg. 2, line 7
        if cfg.target == "soft":
            target = dno.soft_target(r[:, 0], r[:, 1])          # Alg. 1: sigmoid(r+ - r-) (m,)
        losses, st = dno.dno_loss(logp_c, logp_r, ref[:, 0], ref[:, 1], target=target,
                                  eta=cfg.eta)                  # (m,)
        # the mean over the global batch; FSDP averages gradients over ranks, hence * world
        (losses.sum() * (weight * world() / len(batch))).backward()
        sums = [losses.sum().item(), st["margin"].item() * m, st["accuracy"].item() * m, m, ntok]
        acc += weight * torch.tensor(sums, dtype=torch.float64)
    acc = sum_over_ranks(acc, device)
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return acc


def lr_at(cfg, lr_t, s, steps, warm):
    """The lr of step s (0-based): linear warmup over `warm` steps, then cosine or linear decay."""
    if s < warm:
        return lr_t * (s + 1) / warm
    frac = (s + 1 - warm) / max(1, steps - warm)
    if cfg.schedule == "cosine":
        return lr_t * 0.5 * (1 + math.cos(math.pi * frac))
    return lr_t * (1 - frac)


def optimize(model, pairs, cfg, t, device, amp=None):
    """AdamW over <= epochs passes of the pairs, warmup then decay (departure 3). -> step log."""
    from tqdm import tqdm
    lr_t = cfg.lr * cfg.lr_decay ** (t - 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr_t, betas=(0.9, 0.95),
                            weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + t)
    passes = [torch.randperm(len(pairs), generator=g) for _ in range(math.ceil(cfg.epochs))]
    order = torch.cat(passes).tolist()[:max(1, round(len(pairs) * cfg.epochs))]
    steps = math.ceil(len(order) / cfg.batch_size)
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    warm = max(1, round(cfg.warmup * steps))
    log = []
    bar = tqdm(range(steps), disable=rank() != 0, desc=f"train iter {t}", file=sys.stderr)
    for s in bar:
        t0 = time.time()
        lr = lr_at(cfg, lr_t, s, steps, warm)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
        acc = train_step(model, opt, pairs, batch, cfg, device, amp)
        n = acc[3].item()
        log.append({"step": s + 1, "loss": acc[0].item() / n, "margin": acc[1].item() / n,
                    "acc": acc[2].item() / n, "lr": lr})
        if rank() == 0:
            tok_s = acc[4].item() / (time.time() - t0)
            last = log[-1]
            tqdm.write(f"step {s + 1} | loss {last['loss']:.4f} | margin {last['margin']:.4f} | "
                       f"acc {last['acc']:.3f} | lr {lr:.3e} | tok/s {tok_s:.0f}")
    return log


if __name__ == "__main__":
    import tempfile

    from train import Config, prepare
    with tempfile.TemporaryDirectory() as d:
        run = prepare(Config(out=d, iterations=1, num_val=20))
        D_1 = run.slices[0]
        samples = sample_step(run, 1, D_1)
        judgments = judge_step(run, 1, D_1, samples)
        pairs = reference_step(run, 1, pairs_step(run, 1, D_1, samples, judgments))
        for path in (samples, judgments, pairs, train_pi(run, 1, pairs)):
            counts = stages.read_json(os.path.join(path, "manifest.json"))["counts"]
            print(f"{os.path.relpath(path, d)}: {counts}")
        again = todo(run, 1, "samples", policy=run.pi_1, prompts=D_1)
        print("the same samples stage again: reused =", again[1] is None)
        stages.unlock(d)

"""evaluate.py: how good is each DNO iterate? Validation win-rates (vs pi_1 and vs the gold teacher,
both candidate orders, with standard errors), the length-controlled win-rate, the judge audit, the
diagnostics of general preferences (preference cycles, Bradley-Terry vs win-rate rankings, the
teacher's drift), the paper's Table 2 per iteration (the training samples' annotations), Algorithm
1's output (the uniform mixture of iterates) and Algorithm 2's (the best iterate). train.py calls
it; it never trains.

    python evaluate.py --out runs/demo                     # re-render metrics.jsonl, best.json, table, plot of a run
    python evaluate.py --out runs/demo --select_by vs_gold # choose the best iterate by another measure
    python evaluate.py --out runs/demo --table paper       # only Table 2's columns, per iteration
    python evaluate.py --out runs/demo --alpaca_eval alpaca_eval.json   # AlpacaEval 2's model_outputs

Files: OUT/iter_t/eval/{samples,judgments,outcomes}.jsonl + metrics.json (written by train.py
through judge_eval); OUT/metrics.jsonl (one line per evaluated iterate, then the mixture),
OUT/best.json, OUT/metrics.png (matplotlib is optional: without it the run warns once and finishes).
--alpaca_eval: OUT/alpaca_eval/iter_t.json, iterate t's answers to AlpacaEval's instructions
(dnolib/alpaca_eval.py; docs/one_gpu.md, section 6).

Departures from the paper (numbered):
    1. The evaluation judge is the training oracle on held-out prompts (the paper: AlpacaEval 2.0
       and MT-Bench with GPT-4-Turbo), each comparison asked in both orders and averaged.
    2. Length-controlled win-rate: logistic regression of the judgment on tanh(length difference /
       its std), read at zero difference (AlpacaEval 2's idea, not its exact model).
    3. The mixture of iterates: Alg. 1 (line 6) returns unif(pi_1..pi_T); we mix every evaluated
       iterate, unif(pi_1..pi_{T+1}), so the last trained one counts too. It answers each validation
       prompt with one iterate drawn uniformly (seeded by the prompt id); its outcomes are those of
       the drawn iterate (no judge call).
    4. Default selection of the best iterate (Alg. 2, line 9): the length-controlled win-rate vs
       gold, because the paper saw lengths grow each iteration and a raw win-rate rewards that.
    5. Table 2's columns, all of them (annotation_stats, paper_table; metrics.jsonl's "table2"):
       the length is in words of the training samples; a student "win" over the gold needs
       P(sample > gold) > 1/2 (the paper does not say how ties count); for a pairwise judge the
       "scores" are win-rates among the K+1, and with --pairs spin (no annotation) the judge's
       columns are empty. The validation table's mean_len stays in tokens of the eval answers.
"""
from dnolib.cli import early_help
if __name__ == "__main__":
    # --help before the heavy imports: under a second
    early_help(__file__)

import json
import os
import random
import sys
import warnings
from dataclasses import dataclass

import numpy as np

import oracle
from dno import as_table, winrates
from dnolib import alpaca_eval
from dnolib.cli import cli
from dnolib.distributed import print0
from dnolib.stages import read_json, read_jsonl, write_atomic

SELECT = {"lc_vs_gold": "lc_winrate_vs_gold", "vs_gold": "winrate_vs_gold", "lc_vs_init": "lc_winrate_vs_init",
          "vs_init": "winrate_vs_init"}


# ----------------------------------------------------------------------------- statistics
def lc_winrate(y, d):
    """Length-controlled win-rate (departure 2): fit y ~ sigmoid(a + b * tanh(d / std d)), report
    sigmoid(a)."""
    y, d = np.asarray(y, float), np.asarray(d, float)
    if len(y) == 0:
        return None
    X = np.stack([np.ones_like(d), np.tanh(d / (d.std() or 1.0))], 1)   # (N, 2)
    w = np.zeros(2)
    # Newton steps on the (soft-label) log-loss
    for _ in range(50):
        p = 1 / (1 + np.exp(-X @ w))
        H = (X * (p * (1 - p))[:, None]).T @ X + 1e-3 * np.eye(2)
        w -= np.linalg.solve(H, X.T @ (p - y) + 1e-3 * w)
    return float(1 / (1 + np.exp(-w[0])))


def summarize(outcomes, key):
    """Per-prompt outcomes {key: [P(new > other) per order, None = failed], "d_" + key: length
    difference} -> (win-rate, its standard error, LC win-rate); win-rate = mean over prompts of the
    mean over orders."""
    wins, ys, ds = [], [], []
    for o in outcomes:
        ok = [p for p in o.get(key) or [] if p is not None]
        if ok:
            wins.append(float(np.mean(ok)))
            ys, ds = ys + ok, ds + [o["d_" + key]] * len(ok)
    if not wins:
        return None, None, None
    se = float(np.std(wins, ddof=1) / np.sqrt(len(wins))) if len(wins) > 1 else None
    return float(np.mean(wins)), se, lc_winrate(ys, ds)


def audit(outcomes, keys):
    """Judge audit over both-order judgments: failures, ties, and how often the two orders
    disagree."""
    n = failed = ties = both = disagree = 0
    for o in outcomes:
        for k in keys:
            p = o.get(k) or []
            n, failed = n + len(p), failed + sum(x is None for x in p)
            ties += sum(x == 0.5 for x in p)
            if len(p) == 2 and None not in p:
                both, disagree = both + 1, disagree + ((p[0] - .5) * (p[1] - .5) < 0)
    return {"order_disagreement": disagree / both if both else None, "tie_rate": ties / max(1, n - failed),
            "failure_rate": failed / max(1, n)}


# ----------------------------------------------------------------------------- judging an iterate
def judge_eval(run, t, outs):
    """pi_{t+1}'s validation answers `outs` vs pi_1's (iteration 0's) and vs gold, both orders each.
    -> (the eval stage's files: samples, judgments, per-prompt outcomes, metrics; its counts)."""
    new, run_rows = {o["id"]: o["samples"][0] for o in outs}, {r["id"]: r for r in run.val}
    tok = lambda text: len(run.tok.encode(text, add_special_tokens=False))
    opponents = {"gold": {r["id"]: (r["gold"], tok(r["gold"])) for r in run.val if r["gold"]}}
    # pi_1's answers, joined by prompt id
    if t > 0:
        init = read_jsonl(os.path.join(run.out, "iter_0", "eval", "samples.jsonl"))
        opponents["init"] = {o["id"]: (o["samples"][0]["text"], len(o["samples"][0]["tokens"]))
                             for o in init}
    meta = [(r["id"], k, order) for k, opp in opponents.items() for r in run.val if r["id"] in opp
            for order in ("ab", "ba")]
    items = [{"id": f"eval{t}:{rid}:{k}:{order}", "prompt": run_rows[rid]["prompt"], "shuffle": False,
              "candidates": [new[rid]["text"], opponents[k][rid][0]][::1 if order == "ab" else -1]}
             for rid, k, order in meta]
    judged, _ = oracle.ask(run, items, f"iter {t} eval", audit=False)
    outcomes = {r["id"]: {"id": r["id"], "length": len(new[r["id"]]["tokens"])} for r in run.val}
    for (rid, k, order), res in zip(meta, judged):             # P(new > other) in each order
        p = None if not res["ok"] else res["P"][0][1] if order == "ab" else 1 - res["P"][0][1]
        outcomes[rid].setdefault(k, []).append(p)
        outcomes[rid]["d_" + k] = outcomes[rid]["length"] - opponents[k][rid][1]
    outcomes = list(outcomes.values())
    # pi_1 against itself: 1/2 by definition
    if t == 0:
        for o in outcomes:
            o["init"], o["d_init"] = [0.5, 0.5], 0
    m = {"iter": t, "model": "pi_1" if t == 0 else f"iter_{t}/checkpoint", **metrics(outcomes),
         "judge_audit": audit(outcomes, ["gold"] + (["init"] if t else []))}
    files = {"samples.jsonl": outs, "judgments.jsonl": judged, "outcomes.jsonl": outcomes,
             "metrics.json": m}
    return files, {"prompts": len(run.val)}


def metrics(outcomes):
    m = {"mean_length": float(np.mean([o["length"] for o in outcomes]))}
    for k in ("init", "gold"):
        m[f"winrate_vs_{k}"], m[f"se_vs_{k}"], m[f"lc_winrate_vs_{k}"] = summarize(outcomes, k)
    return m


# ----------------------------------------------------------------------------- Table 2
def annotation_stats(seen, provenance):
    """Table 2's row for one iteration's training data: seen = [(pi_t's K sample texts, the
    judgment or None (SPIN), whether the gold is the last candidate)] per prompt of D_t; provenance
    = the new pairs' counts (dno.PROVENANCE). A student "win" is a sample the judge prefers to the
    gold, P[i][gold] > 1/2 (a tie is no win; the paper does not say). Best-of-n win-rate: the share
    of judged prompts with at least one win. Scores: rubric points, or win-rates among the K+1 for
    a pairwise judge (score_kind)."""
    words = [len(x.split()) for texts, _, _ in seen for x in texts]   # the training samples
    wins, scores, gold_scores, kinds = [], [], [], set()
    for texts, res, has_gold in seen:
        if res is None or not res.get("ok"):
            continue
        kinds.add(res.get("score_kind"))
        scores += [v for v in res["scores"][:len(texts)] if v is not None]
        if has_gold:
            g = len(texts)
            gold_scores.append(res["scores"][g])
            wins.append(sum(row[g] is not None and row[g] > 0.5 for row in res["P"][:len(texts)]))
    mean = lambda v: float(np.mean(v)) if v else None           # noqa: E731
    return {"inputs": len(seen), "judged": sum(r is not None and bool(r.get("ok"))
                                                for _, r, _ in seen),
            "words_mean": mean(words),
            "words_sd": float(np.std(words, ddof=1)) if len(words) > 1 else None,
            "best_of_n_vs_gold": mean([w > 0 for w in wins]),
            "student_wins_per_prompt": mean(wins),
            "student_score": mean(scores), "teacher_score": mean(gold_scores),
            "score_kind": "/".join(sorted(k for k in kinds if k)) or None,
            "T>S": provenance.get("gold>sample", 0), "S>T": provenance.get("sample>gold", 0),
            "S>S": provenance.get("sample>sample", 0), "defect": provenance.get("defect", 0),
            "replayed": provenance.get("replay", 0)}


# ----------------------------------------------------------------------------- the report
def iteration_facts(out, t):
    """What iteration t's training stages recorded: pairs, provenance, preference diagnostics,
    teacher, judge."""
    if t == 0:
        return {"num_pairs": 0, "provenance": {}}
    pairs = read_json(os.path.join(out, f"iter_{t}", "pairs", "manifest.json"))["counts"]
    judged = os.path.join(out, f"iter_{t}", "judgments", "manifest.json")
    # --pairs spin asks no judge: no judgments stage
    judge = read_json(judged)["counts"] if os.path.exists(judged) else {"ok": 0, "items": 0}
    s = judge.get("judge", {})
    return {"num_pairs": pairs["pairs"], "provenance": pairs["provenance"], "preferences": pairs.get("preferences"),
            "teacher_winrate": pairs.get("teacher_winrate"), "teacher_score": pairs.get("teacher_score"),
            "table2": pairs.get("table2"),                      # Table 2's row (annotation_stats)
            "train_judge": {"failure_rate": 1 - judge["ok"] / max(1, judge["items"]),
                            "order_disagreement": s.get("order_disagreement"), "position": s.get("position"),
                            "truncated": s.get("truncated")}}


def mixture(out, ts, seed=0):
    """Alg. 1's output, the mixture unif(pi_1..pi_{T+1}) (departure 3): each validation prompt
    answered by one iterate drawn uniformly."""
    per = {t: {o["id"]: o for o in read_jsonl(os.path.join(out, f"iter_{t}", "eval",
                                                           "outcomes.jsonl"))} for t in ts}
    ids = sorted(per[ts[0]])
    drawn = [per[ts[random.Random(f"{seed}:{i}").randrange(len(ts))]][i] for i in ids]
    return {"iter": "mix", "model": f"unif(pi_1..pi_{len(ts)})", **metrics(drawn)}


def best_iterate(rows, select_by):
    """Alg. 2, line 9: the index of the row (one validation metrics.json per iterate) with the
    highest `select_by` measure, the earliest on a tie; with no gold in the prompts, the same
    measure against pi_1. -> (index, metric key)"""
    key = SELECT[select_by]
    if all(r[key] is None for r in rows):
        key = key.replace("gold", "init")
    vals = [-1 if r[key] is None else r[key] for r in rows]
    return vals.index(max(vals)), key


def report(out, select_by="lc_vs_gold", final=False, last=999, view="both"):
    """metrics.jsonl, best.json (Alg. 2, line 9), metrics.png; iterations 0..last; when final, the
    table (view "default"), Table 2's ("paper") or both."""
    ts = [t for t in range(last + 1) if os.path.exists(os.path.join(out, f"iter_{t}", "eval",
                                                                    "done"))]
    if not ts:
        raise FileNotFoundError(f"{out}: no evaluated iterate yet (no iter_0/eval/done); first: python train.py "
                                f"--out {out}")
    gaps = [t for t in range(ts[-1]) if t not in ts]   # a later iterate exists: not just unfinished
    if gaps:
        print0(f"warning: {', '.join(f'iter_{t}' for t in gaps)} of {out} has no finished "
               "evaluation (no eval/done): left out of the table, line 9's choice and the mixture")
    rows = [{**read_json(os.path.join(out, f"iter_{t}", "eval", "metrics.json")), **iteration_facts(out, t)}
            for t in ts]
    mix = mixture(out, ts) if len(ts) > 1 else None
    write_atomic(os.path.join(out, "metrics.jsonl"), "".join(json.dumps(r) + "\n"
                                                             for r in rows + [mix] * bool(mix)))
    i, key = best_iterate(rows, select_by)
    best = rows[i]
    write_atomic(os.path.join(out, "best.json"), json.dumps(
        {"iter": best["iter"], "model": best["model"], "by": f"{key} on validation", key: best[key],
         "mixture": mix}, indent=1))
    plot(out, rows, best, key)
    if final and view in ("default", "both"):
        print0(table(rows, mix, best, key))
    if final and view in ("paper", "both"):
        print0(paper_table(rows))
    return rows, mix, best


def table(rows, mix, best, key):
    f = lambda v, w=6: " " * (w - 2) + "- " if v is None else f"{v:{w}.3f}"    # noqa: E731
    lines = ["iter | vs_init | vs_gold |  +-se | lc_vs_gold | mean_len | pairs | cycles | bt_rank | teacher_r"]
    for r in rows + [mix] * bool(mix):
        pref = r.get("preferences") or {}
        lines.append(f"{r['iter']!s:>4} |  {f(r['winrate_vs_init'])} |  {f(r['winrate_vs_gold'])} | "
                     f"{f(r['se_vs_gold'], 5)} |     {f(r['lc_winrate_vs_gold'])} | {r['mean_length']:8.1f} | "
                     f"{r.get('num_pairs', 0) or 0:5d} | {f(pref.get('cycle_share'))} |  "
                     f"{f(pref.get('bt_disagreement_share'))} | {f(r.get('teacher_winrate'), 9)}"
                     + ("   <- best" if r is best else ""))
    lines.append(f"best iterate: iter {best['iter']} ({best['model']}) by {key}; 'mix' = the uniform mixture of "
                 "iterates (Alg. 1's output)")
    return "\n".join(lines)


def paper_table(rows):
    """Table 2's columns per iteration t: the annotations of pi_t's samples (the paper's "Iter
    t-1") and the new pairs they gave by provenance (T = the gold teacher, S = a student sample)."""
    f = lambda v, w, p=2: " " * (w - 1) + "-" if v is None else f"{v:{w}.{p}f}"    # noqa: E731
    head = "Table 2: iteration t's training data (pi_t's samples; the paper's Iter t-1)"
    lines = [head + "; T = gold, S = sample",
             "iter | paper | inputs | words: mean +/- sd | best-of-n vs T | S wins/prompt | S score | "
             "T score |   T>S |   S>T |   S>S | defect | replay"]
    for r in rows:
        a = r.get("table2")
        if r["iter"] == 0 or not a:
            continue
        sd = "-" if a["words_sd"] is None else f"{a['words_sd']:.1f}"
        words = f"{f(a['words_mean'], 6, 1)} +/- {sd:>6}"
        lines.append(f"{r['iter']:>4} | {r['iter'] - 1:>5} | {a['inputs']:6d} | {words:>18} | "
                     f"{f(a['best_of_n_vs_gold'], 14, 3)} | {f(a['student_wins_per_prompt'], 13)} | "
                     f"{f(a['student_score'], 7)} | {f(a['teacher_score'], 7)} | {a['T>S']:5d} | "
                     f"{a['S>T']:5d} | {a['S>S']:5d} | {a['defect']:6d} | {a['replayed']:6d}")
    kinds = {(r.get("table2") or {}).get("score_kind") for r in rows} - {None}
    kinds = ", ".join(sorted(kinds)) or "none (no annotation)"
    lines.append(f"scores: {kinds}; a student win is P(S > T) > 1/2")
    return "\n".join(lines)


def plot(out, rows, best=None, key=None):
    """OUT/metrics.png: the win-rates with +-1 standard-error bars (the LC win-rate has none), the
    best iterate ringed on its selection measure, and the mean length on an axis from 0 (a
    0.02-token change stays flat)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no metrics.png (pip install matplotlib)",
                      stacklevel=2)
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    x = [r["iter"] for r in rows]
    nan = lambda v: np.nan if v is None else v                  # noqa: E731
    for k, se in (("winrate_vs_init", "se_vs_init"), ("winrate_vs_gold", "se_vs_gold"),
                  ("lc_winrate_vs_gold", None)):
        a.errorbar(x, [nan(r[k]) for r in rows], yerr=[nan(r[se]) for r in rows] if se else None, marker="o",
                   capsize=3, label=k)
    if best is not None and best.get(key) is not None:
        a.plot([best["iter"]], [best[key]], marker="o", markersize=14, fillstyle="none", color="black",
               linestyle="none", label=f"best iterate ({key})")
    lengths = [r["mean_length"] for r in rows]
    b.plot(x, lengths, marker="o")
    b.set_ylim(0, 1.2 * max(lengths) if max(lengths) > 0 else 1)
    a.set(xlabel="iteration", title="validation win-rate (+-1 SE)")
    b.set(xlabel="iteration", title="mean length (tokens)")
    a.legend(fontsize=7)
    for ax in (a, b):
        ax.set_xticks(x)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "metrics.tmp.png"), dpi=100)
    plt.close(fig)
    os.replace(os.path.join(out, "metrics.tmp.png"), os.path.join(out, "metrics.png"))


def alpaca_export(cfg):
    """AlpacaEval 2: iterate t answers AlpacaEval's instructions, one answer each at the run's
    validation temperature (greedy by default) by the run's sampler, written as model_outputs
    (dnolib/alpaca_eval.py)."""
    import torch

    import sample
    from dnolib import vllm_sampler
    from dnolib.model import Transformer
    from dnolib.model_io import load_tokenizer

    if cfg.answer_tokens < 1:
        raise ValueError(f"--answer_tokens must be >= 1; got {cfg.answer_tokens}")
    items = alpaca_eval.read_eval_set(cfg.alpaca_eval)
    t, policy = alpaca_eval.pick_iterate(cfg.out, cfg.iterate)   # before the model loads
    run = read_json(os.path.join(cfg.out, "config.json"))
    vllm = run.get("sampler") == "vllm"                 # the run's engine answers too
    if vllm and vllm_sampler.probe(run["vllm_python"]):
        raise ValueError(vllm_sampler.probe(run["vllm_python"]))
    tok = load_tokenizer(policy)
    prompts = [[{"role": "user", "content": r["instruction"]}] for r in items]
    how = dict(max_new_tokens=cfg.answer_tokens, temperature=run["eval_temperature"],
               top_p=run["top_p"])
    if vllm:
        outs = vllm_sampler.generate(sample, run["vllm_python"], policy, tok, prompts,
                                     range(len(prompts)), 1, run["seed"],
                                     memory=run["vllm_memory"], **how)[0]
    else:
        device = "cuda" if run["device"] != "cpu" and torch.cuda.is_available() else "cpu"
        outs = sample.generate(Transformer.from_pretrained(policy, device=device), tok, prompts,
                               seed=run["seed"], progress=True, **how)
    name = cfg.generator or f"{os.path.basename(os.path.abspath(cfg.out))}-iter_{t}"
    path = os.path.join(cfg.out, "alpaca_eval", f"iter_{t}.json")
    alpaca_eval.write(path, alpaca_eval.model_outputs(items, outs, name))
    print(f"wrote {len(items)} answers of iterate {t} ({policy}) as {name!r} to {path}")


@dataclass
class Config:
    out: str = "out"                # the run folder of a finished or partial train.py run
    select_by: str = "lc_vs_gold"   # best iterate by: lc_vs_gold | vs_gold | lc_vs_init | vs_init
    table: str = "both"             # the table printed: default | paper (Table 2's columns) | both
    # AlpacaEval 2 (dnolib/alpaca_eval.py): an iterate's answers, instead of the report
    alpaca_eval: str = ""           # AlpacaEval's eval set (alpaca_eval.json); "" = the report
    iterate: int = -1               # --alpaca_eval: iterate t to export (0: pi_1; -1: best.json's)
    answer_tokens: int = 2048       # --alpaca_eval: the most new tokens of an answer
    generator: str = ""             # --alpaca_eval: its "generator" name; "" = RUN-iter_t


# -----------------------------------------------------------------------------
def has_cycle(P, tol=1e-9):
    """An intransitive triple i > j > k > i, each preference strictly above 1/2 (+ tol)."""
    W = (np.nan_to_num(as_table(P), nan=0.5) > 0.5 + tol).astype(np.int64)    # (n, n) strict wins
    # a directed 3-cycle closes a walk of length 3
    return bool(np.trace(W @ W @ W) > 0)


def fit_bradley_terry(P, l2=1e-3, steps=3000, lr=0.5):
    """Scalar rewards r maximising 1/2 sum_{i != j} P[i, j] log sigmoid(r_i - r_j) - l2/2 |r|^2
    (ours: the paper fits no BT model); NaN entries (not judged) are left out of the sum."""
    n = len(P)
    off = (1 - np.eye(n)) * ~np.isnan(P)                        # (n, n) judged pairs only
    r, P = np.zeros(n), np.nan_to_num(P)
    # concave: plain gradient ascent suffices
    for _ in range(steps):
        s = 1 / (1 + np.exp(r[None, :] - r[:, None]))           # (n, n) sigmoid(r_i - r_j)
        r += lr / n * (((P - s) * off).sum(1) - l2 * r)
    return r - r.mean()


def fit_bt_table(P):
    """Bradley-Terry rewards (n,) fitted to one table (fit_bradley_terry); NaN for never-judged
    candidates."""
    return np.where(np.isnan(winrates(P)), np.nan, fit_bradley_terry(as_table(P)))


def copeland(P, tol=1e-9):
    """Copeland scores (n,): pairwise majorities won + 1/2 per tie, over the judged pairs (NaN = not
    judged)."""
    A = as_table(P)
    known = ~np.isnan(A) & ~np.eye(len(A), dtype=bool)             # (n, n)
    return ((A > 0.5 + tol) & known).sum(1) + 0.5 * ((np.abs(A - 0.5) <= tol) & known).sum(1)


def ranking_disagrees(P, tol=1e-9):
    """True if the Bradley-Terry fit r and the Copeland ranking c (who wins the pairwise majorities)
    order some pair strictly oppositely: c_i > c_j while r_i < r_j - tol. On a transitive table
    (e.g. rubric scores) they agree; a lopsided loss or a cycle can split them. On a complete table
    BT's order is the win-rate (Borda) order -- at the fit (m - 1) w_i = sum_j sigmoid(r_i - r_j) +
    l2 r_i rises in r_i -- so r = w there, no fit."""
    A = as_table(P)
    w = winrates(A)
    ok = ~np.isnan(w)                                           # judged candidates
    r = w if not np.isnan(A[np.ix_(ok, ok)]).any() else fit_bt_table(A)
    r, c = r[ok], copeland(A, tol)[ok]
    return bool(((c[:, None] > c[None, :]) & (r[:, None] < r[None, :] - tol)).any())


def diagnostics(tables):
    """Shares over prompts: {"n", "cycle_share", "bt_disagreement_share"} (None when there are no
    tables)."""
    n = len(tables)
    share = lambda f: sum(f(P) for P in tables) / n if n else None
    return {"n": n, "cycle_share": share(has_cycle),
            "bt_disagreement_share": share(ranking_disagrees)}


if __name__ == "__main__":
    cfg = cli(Config)
    try:
        if cfg.select_by not in SELECT:
            raise ValueError(f"--select_by must be one of {', '.join(SELECT)}; got {cfg.select_by!r}")
        if cfg.table not in ("default", "paper", "both"):
            raise ValueError(f"--table must be default, paper or both; got {cfg.table!r}")
        if cfg.alpaca_eval:
            alpaca_export(cfg)
        else:
            report(cfg.out, cfg.select_by, final=True, view=cfg.table)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")

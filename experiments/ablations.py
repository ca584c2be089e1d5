"""ablations.py: the paper's Table 1 in miniature on the built-in demo: DNO vs DNO-Restrictive vs
SPIN vs offline DPO vs the SFT policy pi_1, all else equal.

    python -m experiments.ablations                   # 3 seeds, T = 3 (about 15 min on 2 cores)
    python -m experiments.ablations --seeds 0 --iterations 2 --prompts_per_iter 40 --num_val 40
    python -m experiments.ablations --eval_only true  # the table again, from finished runs

Per seed s, OUT/s<s>/ holds demo/ (pi_1 and the prompts, demo.sft with seed s, made once) and one
train.py run per method, each with --seed s, the same pi_1, prompts, judge, validation prompts and
TRAIN flags:
  dno          --pairs margin       Alg. 2 as the paper ran it (line 6's large-margin pairs)
  restrictive  --pairs restrictive  DNO-Restrictive: only pairs whose y+ is the gold (dno.py dep. 8)
  spin         --pairs spin         SPIN: the gold y+, every sample y-, no annotation (judge unpaid)
  offline      --iterations 1 --prompts_per_iter T*n --epochs T: offline DPO, pairs from pi_1's
               samples on all T slices' prompts (the same prompts), judged once, trained T epochs
               with pi_1 (the SFT model) as the reference
  pi_1         the SFT policy itself (the dno run's iter_0 evaluation)
Each method is scored by its last iterate (the paper's Table 1: "Iter 3", "Epoch 4"; line 9's best
too) on the seed's held-out prompts, judged against the gold by the run's own judge in both orders
(evaluate.py): win-rate vs gold (the paper's AlpacaEval 2 is a win-rate against GPT-4-Turbo, the
teacher), and the demo rubric's score of the answer (demo.task.rubric, 0..6). Seeds pool: every (seed, held-out
prompt) is one unit, standard errors are over units, and "- DNO" differences are paired by unit.
Table 2's columns per iteration come from each run's metrics.jsonl (evaluate.annotation_stats),
summed (counts) or averaged (rates) over seeds. OUT/ablations.md holds both tables.

Departures from the paper (numbered):
  1. The task, teacher and judge are the built-in demo's (demo/task.py), not UltraFeedback,
     GPT-4-Turbo and AlpacaEval 2; the judge on held-out prompts is the training oracle.
  2. Offline DPO's pairs come from pi_1's own samples judged once (the paper's came from
     UltraFeedback's fixed responses, i.e. other models'), so it differs from DNO only in being
     one batch trained T epochs against pi_1 instead of T on-policy iterations against pi_t.
  3. The paper's SFT baseline continues SFT on the positives; ours is pi_1 itself (no training).
"""
from dnolib.cli import early_help
if __name__ == "__main__":
    early_help(__file__)                                # --help before torch loads: under a second

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

from dnolib.cli import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("dno", "restrictive", "spin", "offline")


@dataclass
class Config:
    out: str = "runs/ablations"   # one OUT/s<seed>/ per seed: demo/ and a train.py run per method
    seeds: str = "0,1,2"          # comma-separated seeds (split, sampling, pi_1's SFT, batches)
    iterations: int = 3           # T of the on-policy methods; offline DPO trains T epochs
    prompts_per_iter: int = 200   # |D_t| (offline DPO: one slice of T times this)
    num_val: int = 200            # held-out prompts per seed (the same for every method)
    train: str = ""               # more train.py flags, for every method alike
    n_prompts: int = 1000         # demo prompts per seed (validation + T slices must fit)
    sft_steps: int = 600          # pi_1's SFT steps on the teacher's demonstrations (demo.sft)
    eval_only: bool = False       # only the table, from finished runs


# ----------------------------------------------------------------------------- the runs
def train(argv, log):
    """python train.py ARGV in a child process, its output in LOG (flags and errors are train.py's;
    a rerun resumes)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + argv
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
            raise ValueError(f"train.py failed (see {log}): {' '.join(argv)}")


def method_flags(method, cfg):
    """The train.py flags that make one method out of the shared ones."""
    T, n = cfg.iterations, cfg.prompts_per_iter
    if method == "offline":
        return ["--pairs", "margin", "--iterations", "1", "--prompts_per_iter", str(T * n),
                "--epochs", str(T)]
    pairs = "margin" if method == "dno" else method
    return ["--pairs", pairs, "--iterations", str(T), "--prompts_per_iter", str(n)]


def run_seed(cfg, seed):
    """pi_1 for this seed, then one train.py run per method in OUT/s<seed>/<method>."""
    from demo import sft as demo_sft
    root = os.path.join(cfg.out, f"s{seed}")
    demo_cfg = demo_sft.Config(n_prompts=cfg.n_prompts, sft_steps=cfg.sft_steps, threads="1")
    model, prompts = demo_sft.prepare(os.path.join(root, "demo"), seed, demo_cfg)
    shared = ["--model", model, "--prompts", prompts, "--seed", str(seed),
              "--num_val", str(cfg.num_val)] + cfg.train.split()
    for m in METHODS:
        run = os.path.join(root, m)
        os.makedirs(run, exist_ok=True)
        train(["--out", run] + shared + method_flags(m, cfg), os.path.join(root, f"{m}.log"))


# ----------------------------------------------------------------------------- the table
def jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_of(run, which="last"):
    """The run's last evaluated iterate, its best by line 9 (best.json) or pi_1 ("init"):
    (t, {prompt id: its validation outcome and answer})."""
    ts = [int(d[5:]) for d in os.listdir(run) if d.startswith("iter_")
          and os.path.exists(os.path.join(run, d, "eval", "done"))]
    if not ts:
        raise FileNotFoundError(f"{run}: no evaluated iterate (run without --eval_only first)")
    t = {"last": max(ts), "init": 0}.get(which)
    if which == "best":
        with open(os.path.join(run, "best.json"), encoding="utf-8") as f:
            t = json.load(f)["iter"]
    folder = os.path.join(run, f"iter_{t}", "eval")
    answers = {o["id"]: o["samples"][0]["text"] for o in jsonl(os.path.join(folder,
                                                                           "samples.jsonl"))}
    return t, {o["id"]: {**o, "answer": answers[o["id"]]}
               for o in jsonl(os.path.join(folder, "outcomes.jsonl"))}


def unit_values(outcomes, prompts):
    """{prompt id: (win-rate vs gold over both orders or None, rubric score of the answer)}."""
    from demo.task import rubric
    out = {}
    for i, o in outcomes.items():
        ok = [p for p in o.get("gold") or [] if p is not None]
        out[i] = (float(np.mean(ok)) if ok else None, float(rubric(prompts[i], o["answer"])))
    return out


def mean_se(xs):
    """(mean, standard error over units) of a list; SE None below 2 units."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    se = float(np.std(xs, ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else None
    return float(np.mean(xs)), se


def paired(a, b, k):
    """Mean +- SE of a[u][k] - b[u][k] over the units both have."""
    return mean_se([a[u][k] - b[u][k] for u in a if u in b and a[u][k] is not None
                    and b[u][k] is not None])


def fmt(m, se, p=3):
    if m is None:
        return "-"
    return f"{m:.{p}f}" if se is None else f"{m:.{p}f} ± {se:.{p}f}"


def collect(cfg):
    """-> ({policy: {(seed, prompt id): (vs gold, rubric)}} for the last iterates, the same for line
    9's best ones, {method: [metrics.jsonl rows per seed]}, words per policy)."""
    seeds = [int(s) for s in cfg.seeds.split(",")]
    units, best, rows, words = {}, {}, {m: [] for m in METHODS}, {}
    for seed in seeds:
        root = os.path.join(cfg.out, f"s{seed}")
        prompts = {r["id"]: r["prompt"] for r in jsonl(os.path.join(root, "demo", "prompts.jsonl"))}
        for m in ("pi_1",) + METHODS:
            run = os.path.join(root, "dno" if m == "pi_1" else m)
            outs = eval_of(run, "init" if m == "pi_1" else "last")[1]
            vals = unit_values(outs, prompts)
            units.setdefault(m, {}).update({(seed, i): v for i, v in vals.items()})
            words.setdefault(m, []).extend(len(o["answer"].split()) for o in outs.values())
            if m != "pi_1":
                rows[m].append(jsonl(os.path.join(run, "metrics.jsonl")))
                vals = unit_values(eval_of(run, "best")[1], prompts)
                best.setdefault(m, {}).update({(seed, i): v for i, v in vals.items()})
    return units, best, rows, words


def table1(units, best, words, seeds):
    lines = ["| policy (last iterate) | win-rate vs gold | − DNO (paired) | per seed | rubric score "
             "0..6 | − DNO (paired) | words | line 9's best iterate: vs gold |", "|---|" + "---|" * 7]
    names = {"pi_1": "SFT pi_1", "dno": "DNO (--pairs margin)",
             "restrictive": "DNO-Restrictive", "spin": "SPIN", "offline": "offline DPO"}
    for m in ("dno", "restrictive", "spin", "offline", "pi_1"):
        u = units[m]
        per_seed = [mean_se([v[0] for (s, _), v in u.items() if s == seed])[0] for seed in seeds]
        b = best.get(m, u)
        cells = [names[m], fmt(*mean_se([v[0] for v in u.values()])),
                 "" if m == "dno" else fmt(*paired(u, units["dno"], 0)),
                 ", ".join(fmt(x, None) for x in per_seed),
                 fmt(*mean_se([v[1] for v in u.values()]), 2),
                 "" if m == "dno" else fmt(*paired(u, units["dno"], 1), 2),
                 f"{np.mean(words[m]):.2f}", fmt(*mean_se([v[0] for v in b.values()]))]
        lines.append("| " + " | ".join(cells) + " |")
    n = len(units["dno"])
    lines.append(f"\n{n} units = {len(seeds)} seeds x held-out prompts; ± = one standard error over "
                 "units, differences paired by unit. Line 9 chooses on these same prompts, so its "
                 "column is optimistic.")
    return "\n".join(lines)


def table2(rows):
    """Table 2's columns per method and iteration: rates averaged, counts summed over seeds."""
    lines = ["| method | iter (paper's) | inputs | words mean ± sd | best-of-n vs T | S wins/prompt "
             "| S score | T score | T>S | S>T | S>S | defect |", "|---|" + "---|" * 11]
    for m in METHODS:
        by_t = {}
        for seed_rows in rows[m]:
            for r in seed_rows:
                if r.get("iter") not in (None, 0, "mix") and r.get("table2"):
                    by_t.setdefault(r["iter"], []).append(r["table2"])
        for t in sorted(by_t):
            a = by_t[t]
            avg = lambda k, p=2: fmt(*(np.mean([x[k] for x in a]), None), p) \
                if all(x[k] is not None for x in a) else "-"            # noqa: E731
            tot = lambda k: str(sum(x[k] for x in a))                     # noqa: E731
            cells = [m, f"{t} ({t - 1})", tot("inputs"),
                     f"{avg('words_mean')} ± {avg('words_sd')}", avg("best_of_n_vs_gold", 3),
                     avg("student_wins_per_prompt"), avg("student_score"), avg("teacher_score"),
                     tot("T>S"), tot("S>T"), tot("S>S"), tot("defect")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(cfg):
    units, best, rows, words = collect(cfg)
    seeds = [int(s) for s in cfg.seeds.split(",")]
    text = (f"Table 1 in miniature (T = {cfg.iterations}, |D_t| = {cfg.prompts_per_iter}, "
            f"seeds {cfg.seeds}, TRAIN: {cfg.train or '(defaults)'})\n\n"
            + table1(units, best, words, seeds) + "\n\nTable 2's columns (iteration t's training "
            "data: pi_t's samples, the paper's Iter t-1; T = gold, S = sample)\n\n" + table2(rows)
            + "\n")
    with open(os.path.join(cfg.out, "ablations.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return units, rows


def main(argv=None):
    cfg = cli(Config, argv)
    try:
        if not all(s.strip().isdigit() for s in cfg.seeds.split(",")):
            raise ValueError(f"--seeds must be comma-separated integers, e.g. 0,1,2; got "
                             f"{cfg.seeds!r}")
        seeds = [int(s) for s in cfg.seeds.split(",")]
        if cfg.iterations < 1 or cfg.prompts_per_iter < 1 or cfg.num_val < 2:
            raise ValueError("need --iterations >= 1, --prompts_per_iter >= 1, --num_val >= 2")
        if cfg.num_val + cfg.iterations * cfg.prompts_per_iter > cfg.n_prompts:
            raise ValueError(f"--num_val + --iterations x --prompts_per_iter must fit in "
                             f"--n_prompts {cfg.n_prompts}")
        if not cfg.eval_only:
            for seed in seeds:
                run_seed(cfg, seed)
        return report(cfg)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {str(e).splitlines()[0]}")


if __name__ == "__main__":
    main()

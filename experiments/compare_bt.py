"""compare_bt.py: DNO vs a Bradley-Terry-reward loop, like for like, on the intransitive demo.

    python compare_bt.py --out runs/cmp      # DNO, the BT loop (same flags and seed), the table
    python compare_bt.py --out runs/cmp --seeds 0,1,2 --teacher_styles 0.8,0.15,0.05 \
        --train "--iterations 8 --prompts_per_iter 100 --lr 3e-4 --epochs 2 --target soft"
    python compare_bt.py --out runs/cmp --eval_only true   # the table again, from finished runs
    python compare_bt.py --out runs/cmp --at 8,16,32 \
        --train "--iterations 32 --prompts_per_iter 50"   # one run per seed, tables at 8, 16, 32
    python train.py --judge demo_bt ...  # a loop on a fitted BT reward, $DEMO_BT_REWARD

Per seed s, in OUT/s<s>/:
  1. dno/            python train.py --judge J --seed s TRAIN: DNO on the demo task (or on --init).
  2. bt_reward.json  a Bradley-Terry reward r(x, y) = w . features(x, y), fitted by logistic
                     regression on the soft labels of every pair that run 1's judge annotated (its
                     own annotations: every iteration, or with --at its first min(--at)).
  3. bt/             python train.py --judge demo_bt --seed s TRAIN from run 1's pi_1
                     and prompts: the same loop, flags, prompts and pair rule; only the preference
                     is the fitted, transitive one, frozen (--bt frozen).
     bt_refit/       the same BT loop with its reward refitted every iteration t on J's tables of
                     that iteration's candidates of its own pi_t (K samples + gold: what DNO's
                     judge sees of DNO's pi_t), bt_refit/bt_rewards/reward_<t>.json (--bt refit;
                     the judge experiments.compare_bt:demo_bt_refit).
     dno_also/       with --also FLAGS: DNO again with TRAIN plus FLAGS (e.g. --optimistic 6).
  4. evaluation      every policy answers the same held-out prompts, one sample each at temperature
                     1 / top-p 1 (the policy itself), scored by its worst-case win-rate under J
                     against the exact best responses. Under demo_rps and demo_cyclic P(y > y')
                     depends on y's rubric score and style only and rises with the score, so the
                     best responses to any policy are the perfect answers in one of the 3 styles:
                     worst case = min over styles s of mean_x P(pi(x) > perfect_s(x)) (the
                     responder knows the policy, not its samples: one style for all prompts).
                     Standard errors are over prompts; differences are paired by prompt.
  OUT/compare.json, OUT/compare.md: every seed's report and the table (one per --at), each DNO
  row paired by prompt with pi_1, the same row of both BT loops and of plain DNO.
Prefixes (--at 8,16,32): one run of T = 32 iterations holds the runs of T = 8 and 16. Its first
T iterations are exactly a T-iteration run with the same flags: the slices D_t are cut from one
seeded permutation in a fixed size that does not depend on T (train.split; so --prompts_per_iter
must be set: with 0 the size is pool // T), each iteration's lr schedule is its own (optimize.py:
lr_t = lr * lr_decay**(t-1), warmup and decay over that iteration's steps), every seed is drawn
from (seed, t), and --iterations shapes no stage (train.NO_ARTIFACT), so a run grown from T to 32
reuses iterations 1..T untouched (tests/test_run_folder.py; from scratch, a 1- and a 2-iteration
run wrote byte-identical iteration-1 samples, judgments, checkpoint and validation answers). The
BT reward is fitted on the first min(--at) iterations for the same reason: one reward for the
whole BT run, so its prefixes are BT runs of that length too. At prefix T: the mixture is
unif(pi_1..pi_{T+1}), the best iterate is line 9's choice among pi_1..pi_{T+1} (their validation
metrics, --select_by of the run), the last is pi_{T+1}.
Policies: pi_1; per run its best iterate (Alg. 2, line 9), its last one and the uniform mixture
unif(pi_1..pi_{T+1}) (Alg. 1, line 6; --mixture mean: every iterate answers every prompt and the
mixture's win-rate on a prompt is their mean, the exact expectation over the uniform draw, so its
standard error is smaller than with --mixture draw: each prompt answered by one iterate drawn by a
seeded RNG, the same draw for both runs); the teacher in each style, and in the three styles in
turn (a Nash policy under demo_rps). "Acceptable": well-formed with rubric >= 4 (demo_rps's
"correct").

Departures from the paper (numbered):
  1. The baseline is ours: the paper argues the BT limitation in theory but runs no such
     baseline. Its reward sees [rubric score, style ' ', style ',', style '|'] of a response.
  2. The worst case is over the 3 style-fixed perfect answerers (exact for these judges),
     on held-out prompts with one sample per prompt and policy; not AlpacaEval / MT-Bench.
"""
from dnolib.cli import early_help
if __name__ == "__main__":
    early_help(__file__)                                # --help before torch loads: under a second

import json
import math
import os
import random
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

import evaluate
from demo import task as demo_task
from dnolib.cli import cli
from demo.task import STYLES, prompt_rows, rubric, style_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Config:
    out: str = "runs/compare_bt"    # one OUT/s<seed>/{dno,bt} pair of train.py runs per seed
    judge: str = "demo_rps"         # demo_rps | demo_cyclic: DNO's preference (BT is fitted on it)
    seeds: str = "0"                # comma-separated seeds; each seeds one pair of runs
    train: str = "--iterations 8 --target soft --pairs all --replay 0"  # train.py flags of both
    teacher_styles: str = ""        # the demo teacher's style mix, e.g. 0.8,0.15,0.05
    init: str = ""                  # a demo_sft.prepare folder (init/, prompts.jsonl) to start at
    n_prompts: int = 600            # held-out prompts every policy answers
    temperature: float = 1.0        # sampling temperature of every evaluated policy (1: itself)
    top_p: float = 1.0              # nucleus of every evaluated policy (1: the policy itself)
    eval_only: bool = False         # only evaluate finished runs (no training)
    at: str = ""                    # evaluate these prefixes T, e.g. 8,16,32 ("": the whole runs)
    mixture: str = "mean"           # mean: every iterate answers every prompt | draw: one drawn
    bt: str = "frozen,refit"        # BT loops: frozen (fitted once on DNO's) and/or refit (own, per t)
    also: str = ""                  # train.py flags of a second DNO loop, e.g. "--optimistic 6"


# ------------------------------------------------------------ the Bradley-Terry reward
def features(prompt, response):
    """What the BT reward sees of a response: [rubric score, 3 style indicators] (broken: none)."""
    s = style_of(response)
    return [float(rubric(prompt, response))] + [float(s == x) for x in STYLES]


def fit_bt(annotations, steps=500, lr=0.5, l2=1e-3):
    """Bradley-Terry reward r(x, y) = w . features(x, y), fitted by logistic regression on the soft
    labels P(y_i > y_j | x) of every judged pair: what a scalar reward makes of them. -> w (4,)"""
    import torch

    X, Y = [], []
    for prompt, cands, P in annotations:
        f = [features(prompt, c) for c in cands]
        for i in range(len(cands)):
            for j in range(i + 1, len(cands)):
                if P[i][j] is not None:
                    X.append([a - b for a, b in zip(f[i], f[j])])
                    Y.append(P[i][j])
    if not X:
        raise ValueError("no judged pairs to fit a Bradley-Terry reward on")
    X, Y = torch.tensor(X), torch.tensor(Y)  # (N, F), (N,)
    w = torch.zeros(X.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=lr, max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ w, Y)
        loss = loss + l2 * (w ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach().tolist()


def demo_bt(prompt, candidates):
    """The BT loop's judge (train.py --judge demo_bt): P[i][j] = sigmoid(r_i - r_j)
    under the reward of fit_bt, its weights read from the JSON file named by $DEMO_BT_REWARD
    (compare writes it and sets it for the BT run). DNO's loop; only the preference differs."""
    path = os.environ.get("DEMO_BT_REWARD", "")
    if not path or not os.path.exists(path):
        raise ValueError("judge demo_bt needs DEMO_BT_REWARD=FILE.json "
                         "(written by compare_bt.py)")
    with open(path) as f:
        w = json.load(f)["w"]
    r = [sum(a * b for a, b in zip(w, features(prompt, c))) for c in candidates]
    return {"P": [[1.0 / (1.0 + math.exp(rj - ri)) for rj in r] for ri in r]}


def demo_bt_refit(prompt, candidates, id):
    """The refit BT loop's judge (train.py --judge demo_bt_refit, compare_bt.py --bt refit): the
    table of demo_bt under a reward refitted every iteration t on what DNO's judge would say of
    iteration t's candidates of this loop's own pi_t (its K samples and the gold: nothing DNO does
    not see), fitted once and kept as RUN/bt_rewards/reward_<t>.json. $DEMO_BT_REFIT names the run
    folder, $DEMO_BT_JUDGE the true judge. Validation after iteration t (line 9) uses reward t;
    pi_1's validation (t = 0), before any annotation, ties everything (1/2)."""
    run = os.environ.get("DEMO_BT_REFIT", "")
    if not run or not os.path.isdir(run):
        raise ValueError("judge demo_bt_refit needs DEMO_BT_REFIT=RUN_FOLDER (set by compare_bt.py)")
    head = id.split(":", 1)[0]                                  # "train<t>" or "eval<t>"
    t = int(head[5:] if head.startswith("train") else head[4:])
    if t == 0:
        return {"P": [[0.5] * len(candidates) for _ in candidates]}
    w = refit_reward(run, t, os.environ.get("DEMO_BT_JUDGE", "demo_rps"))
    r = [sum(a * b for a, b in zip(w, features(prompt, c))) for c in candidates]
    return {"P": [[1.0 / (1.0 + math.exp(rj - ri)) for rj in r] for ri in r]}


REFIT = {}                                          # (run, t) -> w: one fit per iteration per process


def refit_reward(run, t, judge):
    """w of iteration t: RUN/bt_rewards/reward_<t>.json, else fit_bt on the true judge's tables of
    RUN/iter_t's samples (+ the gold where the run judges it) and write it (atomic)."""
    path = os.path.join(run, "bt_rewards", f"reward_{t}.json")
    if (run, t) not in REFIT and os.path.exists(path):
        with open(path) as f:
            REFIT[(run, t)] = json.load(f)["w"]
    if (run, t) not in REFIT:
        cfg = run_config(run)
        prompts = {r["id"]: r for r in jsonl(cfg["prompts"])}
        pref_fn, ann = demo_task.PREFS[judge], []
        for s in jsonl(os.path.join(run, f"iter_{t}", "samples", "samples.jsonl")):
            row = prompts[s["id"]]
            cands = [x["text"] for x in s["samples"]]
            cands += [row["gold"]] if cfg.get("gold", True) and row.get("gold") else []
            ann.append((row["prompt"], cands,
                        [[pref_fn(row["prompt"], a, b) for b in cands] for a in cands]))
        REFIT[(run, t)] = fit_bt(ann)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump({"w": REFIT[(run, t)], "features": ["score", " ", ",", "|"], "judge": judge,
                       "iteration": t, "annotated_prompts": len(ann)}, f)
        os.replace(path + ".tmp", path)
    return REFIT[(run, t)]


def jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_annotations(out, upto=0):
    """(prompt, candidates, P) of every training prompt judged in a train.py run (K samples, then
    the gold if it was a candidate), its iterations 1..upto (0: all). -> (annotations, T)"""
    prompts = {r["id"]: r for r in jsonl(run_config(out)["prompts"])}
    got, t = [], 1
    while os.path.exists(os.path.join(out, f"iter_{t}", "judgments", "done")):
        if upto and t > upto:
            break
        samples = jsonl(os.path.join(out, f"iter_{t}", "samples", "samples.jsonl"))
        samples = {s["id"]: s for s in samples}
        for res in jsonl(os.path.join(out, f"iter_{t}", "judgments", "judgments.jsonl")):
            key = res["id"].split(":", 1)[-1]       # "train{t}:<id>" or "<id>": joined by id
            s, row = samples[key], prompts[key]
            if res["ok"] and res.get("P"):
                texts = [x["text"] for x in s["samples"]]
                gold = [row["gold"]] if len(res["P"]) == len(texts) + 1 else []   # --gold false
                got.append((row["prompt"], texts + gold, res["P"]))
        t += 1
    return got, t - 1


def restyle(response, style):
    """The same digits joined by another separator (a broken response is re-joined as well)."""
    return style.join(c for c in response if c.isdigit())


# ------------------------------------------------------------ the two runs
def train(argv, env=None):
    """python train.py ARGV in a child process (flags, errors and resumption are train.py's)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + argv
    print("$ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd, env={**os.environ, **(env or {})}).returncode != 0:
        raise ValueError(f"train.py failed: {' '.join(argv)}")


def run_pair(cfg, seed, flags, upto=0):
    """OUT/s<seed>/: dno (DNO), bt_reward.json (fitted on its annotations of iterations 1..upto,
    0: all), bt (the BT loop)."""
    root = os.path.join(cfg.out, f"s{seed}")
    dno_dir, bt_dir, reward = (os.path.join(root, n) for n in ("dno", "bt", "bt_reward.json"))
    styles = ["--teacher_styles", cfg.teacher_styles] if cfg.teacher_styles else []
    common = ["--seed", str(seed)] + flags
    demo = cfg.init or os.path.join(dno_dir, "demo")    # "": the DNO run prepares the demo task
    start = ["--model", os.path.join(demo, "init"),
             "--prompts", os.path.join(demo, "prompts.jsonl")]
    train(["--judge", cfg.judge, "--out", dno_dir] + (start if cfg.init else styles) + common)
    annotations, T = read_annotations(dno_dir, upto)
    w = fit_bt(annotations)
    with open(reward, "w") as f:
        json.dump({"w": w, "features": ["score", " ", ",", "|"], "judge": cfg.judge,
                   "annotated_prompts": len(annotations), "iterations": T}, f)
    print(f"BT reward on {len(annotations)} prompts judged by {cfg.judge} over {T} iterations: "
          f"w = {[round(x, 2) for x in w]} (score, ' ', ',', '|')", flush=True)
    if "frozen" in cfg.bt.split(","):
        train(["--judge", "demo_bt", "--out", bt_dir] + start + common,
              env={"DEMO_BT_REWARD": reward})
    refit = os.path.join(root, "bt_refit")
    if "refit" in cfg.bt.split(","):                # reward refitted on its own iteration t
        train(["--judge", "experiments.compare_bt:demo_bt_refit", "--out", refit] + start + common,
              env={"DEMO_BT_REFIT": refit, "DEMO_BT_JUDGE": cfg.judge})
    if cfg.also:                                    # DNO again, with the extra flags
        train(["--judge", cfg.judge, "--out", os.path.join(root, "dno_also")] + start + common
              + cfg.also.split())


# ------------------------------------------------------------ evaluation
def run_config(run):
    """The flags of a train.py run (its first stage's manifest; the demo fills in --prompts)."""
    path = os.path.join(run, "iter_1", "samples", "manifest.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run}: no train.py run there (no iter_1/samples)")
    with open(path) as f:
        return json.load(f)["config"]


def iterates(run, T=0):
    """[pi_1, ..., pi_{T+1}] folders of a train.py run (T = 0: all it has), and line 9's best
    among them: the highest validation metric the run selects by (ties: the earliest)."""
    cfg = run_config(run)
    paths, t = [cfg["model"] or os.path.join(run, "demo", "init")], 1
    while os.path.exists(os.path.join(run, f"iter_{t}", "checkpoint", "done")):
        if T and t > T:
            break
        paths.append(os.path.join(run, f"iter_{t}", "checkpoint"))
        t += 1
    if T and len(paths) < T + 1:
        raise ValueError(f"{run}: {len(paths) - 1} finished iterations, --at asks for {T}")
    rows = []
    for t in range(len(paths)):                                 # iter_t/eval: pi_{t+1}
        with open(os.path.join(run, f"iter_{t}", "eval", "metrics.json")) as f:
            rows.append(json.load(f))
    best, _ = evaluate.best_iterate(rows, cfg.get("select_by", "lc_vs_gold"))
    return paths, best                                          # 0 = pi_1, t = pi_{t+1}


def answers(path, rows, temperature, top_p, seed, cache):
    """One sample per row from the policy at path (cached by (path, row id))."""
    from dnolib.model import Transformer
    from dnolib.model_io import load_tokenizer
    from sample import generate

    todo = [r for r in rows if (path, r["id"]) not in cache]
    if todo:
        model, tok = Transformer.from_pretrained(path), load_tokenizer(path)
        outs = generate(model, tok, [r["prompt"] for r in todo], num_samples=1,
                        max_new_tokens=24, temperature=temperature, top_p=top_p, seed=seed,
                        ids=[r["id"] for r in todo])
        cache.update({(path, r["id"]): o[0]["text"] for r, o in zip(todo, outs)})
    return [cache[(path, r["id"])] for r in rows]


def run_policies(run, rows, cfg, seed, cache, T=0):
    """{best, last, mixture} of one run's first T iterations, each a list of answer sets (one
    answer per row in each): best and last one set; the mixture one set per iterate (--mixture
    mean: scored as the mean over iterates, the exact expectation over Alg. 1's uniform draw) or
    one set where prompt k is answered by a drawn iterate pick[k] (--mixture draw). -> policies,
    which iterates they are, pi_1's folder."""
    paths, best = iterates(run, T)
    full = lambda p: answers(p, rows, cfg.temperature, cfg.top_p, seed, cache)
    if cfg.mixture == "mean":
        mix = [full(p) for p in paths]
    else:
        pick = random.Random(seed).choices(range(len(paths)), k=len(rows))
        drawn = [None] * len(rows)
        for i, p in enumerate(paths):
            mine = [k for k in range(len(rows)) if pick[k] == i]
            got = answers(p, [rows[k] for k in mine], cfg.temperature, cfg.top_p, seed, cache)
            for k, y in zip(mine, got):
                drawn[k] = y
        mix = [drawn]
    which = {"best": f"pi_{best + 1}", "last": f"pi_{len(paths)}",
             "mixture": f"unif(pi_1..pi_{len(paths)})"}
    return {"best": [full(paths[best])], "last": [full(paths[-1])], "mixture": mix}, which, paths[0]


def score(pref_fn, rows, sets):
    """Per-prompt win-rates (3, n) against the perfect answer in each style, averaged over the
    answer sets (a mixture's iterates); the worst style."""
    perfect = [sorted(demo_task.parse_prompt(r["prompt"])) for r in rows]
    W = np.mean([[[pref_fn(r["prompt"], y, s.join(map(str, p)))
                   for r, y, p in zip(rows, ys, perfect)] for s in STYLES]
                 for ys in sets], axis=0)                                      # (3, n)
    return W, int(W.mean(1).argmin())


def evaluate_seed(cfg, seed, T=0):
    """Every policy of OUT/s<seed> (its runs' first T iterations; 0: all): worst case, SE, paired
    differences, styles, acceptable."""
    root = os.path.join(cfg.out, f"s{seed}")
    pref_fn = demo_task.PREFS[cfg.judge]
    known = {r["prompt"] for r in jsonl(run_config(os.path.join(root, "dno"))["prompts"])}
    styles = demo_task.parse_styles(cfg.teacher_styles) if cfg.teacher_styles else None
    styles = styles or demo_task.TEACHER_STYLE_P
    sizes = [len(demo_task.parse_prompt(p)) for p in known]    # the runs' prompts' list lengths
    rows = prompt_rows(cfg.n_prompts, seed, "heldout", known, styles,   # no prompt the runs saw
                       (min(sizes), max(sizes)))
    cache, policies, which = {}, {}, {}
    dno_pols, dno_which, pi_1 = run_policies(os.path.join(root, "dno"), rows, cfg, seed, cache, T)
    policies["pi_1"] = [answers(pi_1, rows, cfg.temperature, cfg.top_p, seed, cache)]
    policies.update({f"DNO {k}": v for k, v in dno_pols.items()})
    which.update({f"DNO {k}": v for k, v in dno_which.items()})
    loops = (("dno_also", f"DNO {cfg.also}"), ("bt", "BT loop"), ("bt_refit", "BT refit"))
    for folder, label in loops:                         # the other loops that ran
        if os.path.exists(os.path.join(root, folder, "best.json")):
            got, got_which, _ = run_policies(os.path.join(root, folder), rows, cfg, seed, cache, T)
            policies.update({f"{label} {k}": v for k, v in got.items()})
            which.update({f"{label} {k}": v for k, v in got_which.items()})
    for s in STYLES:                                    # the exploiters a cycle rewards
        policies[f"teacher {s!r}"] = [[restyle(r["gold"], s) for r in rows]]
    turn = [restyle(r["gold"], STYLES[k % 3]) for k, r in enumerate(rows)]
    policies["teacher, styles in turn"] = [turn]
    n, per, report = len(rows), {}, {}
    for name, sets in policies.items():
        W, worst = score(pref_fn, rows, sets)
        per[name] = W[worst]                                    # (n,) vs the best response
        ys = [y for one in sets for y in one]                   # every answer of every set
        sc = [rubric(r["prompt"], y) for r, y in zip(rows * len(sets), ys)]
        ok = [style_of(y) is not None and s >= demo_task.RPS_CAP for y, s in zip(ys, sc)]
        report[name] = {"which": which.get(name, ""), "worst": float(W[worst].mean()),
                        "se": float(W[worst].std(ddof=1) / math.sqrt(n)),
                        "best_response": STYLES[worst], "acceptable": float(np.mean(ok)),
                        "styles": [sum(style_of(y) == s for y in ys) / len(ys) for s in STYLES],
                        "mean_rubric": float(np.mean(sc))}
    for name in report:                                         # paired by prompt
        kind = name.split()[-1]                                 # mixture | best | last
        refs = (("vs pi_1", "pi_1"), ("vs BT loop", f"BT loop {kind}"),
                ("vs BT refit", f"BT refit {kind}"), ("vs DNO", f"DNO {kind}"))
        for key, ref in refs:
            if ref in per and ref != name and (key == "vs pi_1" or name.startswith("DNO")):
                d = per[name] - per[ref]                        # (n,) paired differences
                report[name][key] = [float(d.mean()), float(d.std(ddof=1) / math.sqrt(n))]
    return report


def markdown(reports):
    """One table: a row per policy, a 'worst case +- SE' cell per seed, the paired differences,
    the style shares and the acceptable share (means over seeds)."""
    names = list(next(iter(reports.values())))
    cols = ["policy"] + [f"seed {s}: worst case" for s in reports]
    cols += ["vs pi_1", "vs BT loop", "vs BT refit", "vs DNO", "styles ' ' / ',' / '\\|'",
             "acceptable"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for a in names:
        rs = [rep[a] for rep in reports.values()]
        cells = [f"{r['worst']:.3f} ± {r['se']:.3f}" for r in rs]
        diffs = [", ".join(f"{r[k][0]:+.3f} ± {r[k][1]:.3f}" for r in rs if k in r) or "-"
                 for k in ("vs pi_1", "vs BT loop", "vs BT refit", "vs DNO")]
        st = " / ".join(f"{np.mean([r['styles'][i] for r in rs]):.2f}" for i in range(3))
        ok = ", ".join(f"{r['acceptable']:.3f}" for r in rs)
        lines.append("| " + " | ".join([a.replace("|", "\\|")] + cells + diffs + [st, ok]) + " |")
    return "\n".join(lines)


def parse_at(at, flags):
    """--at "8,16,32" -> [8, 16, 32] (each <= --iterations of --train, which must fix
    --prompts_per_iter: see Prefixes above); "" -> [0] (the whole runs)."""
    if not at:
        return [0]
    try:
        Ts = sorted({int(x) for x in at.split(",")})
    except ValueError:
        raise ValueError(f"--at must be comma-separated iteration counts, got {at!r}") from None
    T = int(flags[flags.index("--iterations") + 1]) if "--iterations" in flags[:-1] else 3
    per = flags[flags.index("--prompts_per_iter") + 1] if "--prompts_per_iter" in flags[:-1] else 0
    if Ts[0] < 1 or Ts[-1] > T or int(per) <= 0:
        raise ValueError(f"--at needs 1 <= T <= the runs' --iterations ({T}) and --train with "
                         "--prompts_per_iter > 0 (slices that do not depend on T)")
    return Ts


def compare(cfg):
    """Train (unless --eval_only) and evaluate every seed; OUT/compare.{json,md}. -> reports"""
    if cfg.judge not in demo_task.PREFS:
        raise ValueError(f"--judge must be a pairwise demo judge: {', '.join(demo_task.PREFS)}")
    if cfg.teacher_styles:
        demo_task.parse_styles(cfg.teacher_styles)     # a bad mix: one line, before any run
    if cfg.n_prompts < 2 or not 0 < cfg.top_p <= 1 or cfg.temperature <= 0:
        raise ValueError("need --n_prompts >= 2, --top_p in (0, 1], --temperature > 0")
    if not set(cfg.bt.split(",")) <= {"frozen", "refit", ""}:
        raise ValueError(f"--bt must name frozen and/or refit (comma-separated), got {cfg.bt!r}")
    if cfg.mixture not in ("mean", "draw"):
        raise ValueError(f"--mixture must be mean or draw, got {cfg.mixture!r}")
    try:
        seeds = [int(s) for s in cfg.seeds.split(",")]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {cfg.seeds!r}") from None
    flags = cfg.train.split()
    taken = {"--judge", "--out", "--seed", "--model", "--prompts", "--teacher_styles"} & set(flags)
    if taken:
        raise ValueError(f"--train may not set {', '.join(sorted(taken))} (compare_bt sets it)")
    if cfg.init and not os.path.exists(os.path.join(cfg.init, "prompts.jsonl")):
        raise FileNotFoundError(f"--init {cfg.init}: no prompts.jsonl (demo_sft.prepare's)")
    at = parse_at(cfg.at, flags)
    reports = {}                                                # T -> seed -> report
    for seed in seeds:
        if not cfg.eval_only:
            run_pair(cfg, seed, flags, min(at))      # [0]: fit on all
        for T in at:
            reports.setdefault(T, {})[seed] = evaluate_seed(cfg, seed, T)
    tables = [(f"T = {T}\n\n" if T else "") + markdown(reports[T]) for T in at]
    with open(os.path.join(cfg.out, "compare.json"), "w") as f:
        json.dump({"config": vars(cfg), "reports": reports if at != [0] else reports[0]}, f,
                  indent=1)
    with open(os.path.join(cfg.out, "compare.md"), "w") as f:
        f.write("\n\n".join(tables) + "\n")
    print(f"judge {cfg.judge}, {cfg.n_prompts} held-out prompts, temperature {cfg.temperature}, "
          f"top-p {cfg.top_p}, train flags: {cfg.train}\n" + "\n\n".join(tables))
    return reports if at != [0] else reports[0]


if __name__ == "__main__":
    try:
        compare(cli(Config))
    except (ValueError, OSError) as e:
        sys.exit(f"error: {str(e).splitlines()[0]}")

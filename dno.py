"""dno.py: the algorithm of Direct Nash Optimization (Rosset et al., 2024, arXiv 2404.03715).

Usage:
    python dno.py                                 # one prompt: r_t, its pairs, the loss (CPU)
    python dno.py --candidates 8 --eta 0.5 --seed 1
    python -m pytest -q tests/test_dno.py tests/test_alg1_model.py   # the checks below, CPU, seconds

    from logps import pair_logps         # the loss's inputs, log pi(y|x) summed over y: logps.py
    from dno import dno_loss, winrates, table_from_scores, select_pairs, all_pairs, soft_target
    logp_pos, logp_neg, n_tokens = pair_logps(model, stored_pairs, device)   # (m,), (m,)
    losses, stats = dno_loss(logp_pos, logp_neg, ref_logp_pos, ref_logp_neg, target=1.0, eta=0.1)
    r = winrates(table_from_scores(scores)); pairs = all_pairs(r)   # Alg. 1: target soft_target(r_a, r_b)

What lives here: the one loss behind both of the paper's objectives, win-rates, the authors' pair
rule and Alg. 1's all pairs, and replay. The loss's inputs, per-sequence log-probs, are logps.py;
diagnostics of general (possibly cyclic) preferences are preferences.py. Alg. 2's loop is train.py;
Alg. 1 run exactly on a tabular game (no model, no estimates) is tabular.py. "Alg. 1, step k" (1:
r_t, 2: the ideal update Eq. 9, 3: the regression Eq. 8) and "Alg. 2, line k" follow
docs/paper.md.

Glossary (the paper's notation):
    x, y, y'       a prompt and two responses to it.
    P(y > y' | x)  the general preference: probability that y is preferred to y' (P(y>y') + P(y'>y)
                   = 1). It need not come from any scalar score, so it may be cyclic (A > B > C >
                   A).
    P(pi > pi')    E_{y ~ pi, y' ~ pi'} P(y > y' | x); the Nash policy pi* maximises min_pi' P(pi >
                   pi').
    pi_t           the policy at iteration t. It is also the REFERENCE of iteration t's loss:
                   the previous iterate, not the SFT model (pi_1 is the SFT model).
    r_t(x, y)      P(y > pi_t | x) = E_{y' ~ pi_t} P(y > y' | x) in [0, 1] (Alg. 1, line 3). Alg. 2
                   (line 5) estimates it by y's win-rate among the K+1 judged candidates (winrates).
    eta            Alg. 1: the learning rate of the ideal update pi_{t+1} ~ pi_t exp(r_t / eta) (Eq.
                   9); in the loss it scales the log-ratio like DPO's beta; the soft-target optimum
                   is eta * dlog(pi/pi_t) = dr_t. Alg. 2 (Eq. 13) reuses the symbol for a rescaled
                   value: r_t -> c r_t, eta -> c eta leaves Eq. 9 unchanged and lets the hard target
                   1 stand for sigmoid(c dr_t) ~ 1, so DNO-Prct's proper eta is larger than Alg. 1's
                   (Sec. 4). The authors ran 0.1 or 0.05 (TRL's DPO beta); our default 0.1 is that
                   DPO-beta-like value, in tabular.py too (1/eta = 10: big steps).
    y+ / y-        the chosen (positive) and rejected (negative) response of a training pair.
    mu_1, mu_2     where Alg. 1's pairs (y_1, y_2) come from; DNO-Prct: both pi_t (its K samples)
                   plus the gold.
    exploitability max_pi' P(pi' > pi) - 1/2 (= max over single responses y of P(y > pi) - 1/2); 0
    at Nash.

Departures from the paper (deliberate, numbered):
    1. select_pairs(kind="winrate") is ours. The paper states its rule for a 6-point rubric
       (positive >= 5, negative >= 2 lower, >= 1 lower if the positive is a policy sample). For
       win-rates among K+1 = 6 candidates, where one rank is 1/5 = 0.2, we use: positive win-rate >=
       0.6 (it beats most of the others), negative >= 0.4 lower (two ranks) behind the gold, >= 0.2
       lower (one rank) behind a policy sample. Comparisons use a 1e-9 tolerance so 0.8 - 0.6 counts
       as 0.2.
    2. The repeated n-gram detector is ours (the paper gives no definition): a text is defective
       when more than half of its word 4-grams, or of its character 10-grams, are repeats of earlier
       ones. A defective candidate is never a positive, and is the negative of every qualifying
       positive whatever its judge score (provenance "defect"); our reading of "used as negatives".
    3. Replay: "30% from t-1, 15% from t-2, and so on" is read as shares of the final training set,
       halving with no cut-off (replay_shares(first=0.3)), sampled without replacement, capped by
       what an iteration has ("at most"). The replayed pairs follow the current ones; the trainer
       shuffles.
    4. dno_loss detaches the reference log-probs (pi_t is a constant of iteration t's objective),
       and its "accuracy" diagnostic counts a pair right when sign(h) agrees with target > 1/2.
    5. Soft targets (Alg. 1, line 4 on a model; train.py --target soft): r_t is the win-rate among
       the K+1 candidates (for rubric judges over table_from_scores), gold included; with
       train.py --opponents samples, against pi_t's K samples only (winrates(P, opponents): Alg. 1
       line 3's E_{y' ~ pi_t}, the gold a candidate but no opponent). train.py's pair
       distributions: "all" (all_pairs, closest to Alg. 1 with mu_1 = mu_2 = pi_t plus the gold) and
       "margin" (Alg. 2 line 6's large-margin rule, with target sigmoid(dr_t) instead of 1).
       all_pairs counts a defective candidate as r = 0 (it loses to every other).
    6. train.py --target soft: r_t is estimated from pi_t's samples drawn at --temperature 0.7 /
       --top_p 0.95 (the tempered, truncated pi_t, as the paper samples), while the loss's reference
       is pi_t itself; --temperature 1 --top_p 1 makes the two the same policy.
    7. The paper's training paragraph lists "alpha 0.005" beside the learning rate and beta without
       saying what it weights (our guesses: a label-smoothing epsilon, dno_loss's target 1 - alpha,
       or the weight of an NLL term on y+). It is not implemented.
    8. Table 1's ablations as pair rules (train.py --pairs): teacher_pairs is DNO-Restrictive, whose
       rule the paper gives only as "the teacher's output is the preferred one". Table 2's
       iteration-0 rows share one annotation, yet Restrictive keeps 42.4k T>S pairs and DNO 30.7k,
       so its rule is not DNO's margin rule cut to gold positives: we admit every pair the gold
       wins, with no margin and no floor. spin_pairs is SPIN (the gold y+, every sample y-, no
       annotation).
    Extension 1 (ours, after the paper's Appendix A): geometric_reference, train.py --ref_mix.
    Extension 2 (ours, optimistic multiplicative weights): optimistic_reference, --optimistic.
"""
from dnolib.cli import early_help
if __name__ == "__main__":
    # --help before the heavy imports: under a second
    early_help(__file__)

import math
import random
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from dnolib.cli import cli


# ----------------------------------------------------------------------------- the loss

# Alg. 1, line 4 (regression form, Eq. 8) and Alg. 2, line 7 (DNO-Prct, Eq. 13) are one binary
#   cross-entropy: h(a, b) = eta * [ log pi(y_a|x)/pi_t(y_a|x) - log pi(y_b|x)/pi_t(y_b|x) ]
#   loss    = - [ p * log sigmoid(h) + (1 - p) * log sigmoid(-h) ]
#   Alg. 1: p = soft_target(r_t(x, y_a), r_t(x, y_b))  (= sigmoid(dr_t); optimum eta * dlogratio =
#           dr_t, i.e. pi = pi_t exp(r_t / eta) / Z, the ideal update of Alg. 1, line 4's target (Eq. 9))
#   Alg. 2: p = 1 on (y_a, y_b) = (y+, y-)            (hard target; DPO with reference pi_t)
# With p = 1 - eps this is label-smoothed DPO with smoothing eps. pi_t is the previous iterate.
def dno_loss(pi_logp_a, pi_logp_b, ref_logp_a, ref_logp_b, target, eta):
    """Per-pair losses (N,) and detached mean diagnostics. target: float or (N,) = P(y_a
    preferred)."""
    chosen = pi_logp_a - ref_logp_a.detach()                   # (N,) log pi/pi_t (y_a)
    rejected = pi_logp_b - ref_logp_b.detach()                 # (N,) log pi/pi_t (y_b)
    h = eta * (chosen - rejected)                              # (N,) implicit margin
    p = torch.as_tensor(target, dtype=h.dtype, device=h.device)
    losses = -(p * F.logsigmoid(h) + (1 - p) * F.logsigmoid(-h))   # (N,)
    with torch.no_grad():
        stats = {"margin": h.mean(),
                 "accuracy": ((h > 0) == (p > 0.5)).float().mean(),
                 "chosen_logratio": chosen.mean(),
                 "rejected_logratio": rejected.mean()}
    return losses, stats


# ----------------------------------------------------------------------------- win-rates

def as_table(P):
    """Nested lists / arrays with None -> float (n, n) array with NaN."""
    rows = [[np.nan if v is None else float(v) for v in row] for row in P]
    if any(len(row) != len(rows) for row in rows):
        raise ValueError(f"preference table must be square (n, n), got row lengths {[len(r) for r in rows]}")
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(rows))


def winrates(P, opponents=None):
    """r(y_i) = mean over j != i of P[i, j] = P(y_i > y_j | x) (Alg. 2, line 5). NaN/None skipped;
    a candidate with no known comparison gets NaN. opponents (indices): only those j count, e.g.
    pi_t's samples, so r_t(y) estimates E_{y' ~ pi_t} P(y > y') (Alg. 1, line 3) for every
    candidate y, the gold included (leave-one-out for a sample)."""
    A = as_table(P)
    known = ~np.isnan(A) & ~np.eye(len(A), dtype=bool)          # (n, n)
    if opponents is not None:
        known &= np.isin(np.arange(len(A)), list(opponents))[None, :]
    count = known.sum(1)
    total = np.where(known, A, 0.0).sum(1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)   # (n,)


def table_from_scores(scores):
    """Listwise scores (the paper's 6-point rubric) -> P[i, j] = 1 if s_i > s_j, 1/2 on ties, 0
    else. The diagonal is 1/2; a failed (None / NaN) score gives a NaN row and column."""
    s = np.array([np.nan if v is None else float(v) for v in scores], dtype=np.float64)
    P = 0.5 * (np.sign(s[:, None] - s[None, :]) + 1.0)          # (n, n), NaN where either is NaN
    return P


# ----------------------------------------------------------------------------- pair selection

# The authors' rule (Section 5): positive >= 5 of 6; negative >= 2 lower, >= 1 lower when the
# positive is a policy sample. "winrate" thresholds are ours (departure 1).
PAIR_RULES = {"rubric": {"min_positive": 5.0, "margin": 2.0, "sample_margin": 1.0},
              "winrate": {"min_positive": 0.6, "margin": 0.4, "sample_margin": 0.2}}
EPS = 1e-9


def is_defective(text, n=4, n_chars=10, max_repeat=0.5, min_ngrams=4):
    """True if more than max_repeat of the word n-grams, or of the character n_chars-grams, repeat
    an earlier one (degenerate loops such as "the the the ..." or "7777777..."). Departure 2."""
    def repeated(units, k):
        grams = [tuple(units[i:i + k]) for i in range(len(units) - k + 1)]
        return len(grams) >= min_ngrams and 1 - len(set(grams)) / len(grams) > max_repeat
    return repeated(text.split(), n) or repeated(text, n_chars)


# where a pair's y+ and y- come from
PROVENANCE = ("gold>sample", "sample>gold", "sample>sample", "defect")


def _provenance(i, j, gold_index):
    if i == gold_index:
        return "gold>sample"
    return "sample>gold" if j == gold_index else "sample>sample"


def select_pairs(scores, gold_index, defective=None, *, kind="rubric", min_positive=None, margin=None,
                 sample_margin=None):
    """Every large-margin (y+, y-) pair among one prompt's K+1 candidates (Alg. 2, line 6).

    scores: rubric scores 0..6 (kind="rubric") or win-rates in [0, 1] (kind="winrate"); None/NaN =
    judge failed, never paired. gold_index: the teacher's column (None if there is none). defective:
    per-candidate flags (is_defective). Returns [{"chosen", "rejected", "provenance", "margin"}]
    sorted by (chosen, rejected); margin = score(y+) - score(y-).
    """
    if kind not in PAIR_RULES:
        raise ValueError(f"select_pairs: kind must be one of {sorted(PAIR_RULES)}, got {kind!r}")
    rule = dict(PAIR_RULES[kind])
    for name, v in (("min_positive", min_positive), ("margin", margin),
                    ("sample_margin", sample_margin)):
        if v is not None:
            rule[name] = float(v)
    s = [None if v is None or math.isnan(float(v)) else float(v) for v in scores]
    n = len(s)
    if gold_index is not None and not 0 <= gold_index < n:
        raise ValueError(f"select_pairs: gold_index {gold_index} out of range for {n} candidates")
    defective = [False] * n if defective is None else [bool(d) for d in defective]
    if len(defective) != n:
        raise ValueError(f"select_pairs: {len(defective)} defect flags for {n} candidates")
    pairs = []
    for i in range(n):
        # the positive must be good in absolute terms, judged, and not degenerate
        if s[i] is None or defective[i] or s[i] < rule["min_positive"] - EPS:
            continue
        need = rule["margin"] if i == gold_index else rule["sample_margin"]
        for j in range(n):
            if j == i or s[j] is None:
                continue
            gap = s[i] - s[j]
            if defective[j]:
                provenance = "defect"                           # automatic negative, any score
            elif gap > EPS and gap >= need - EPS:
                # ties never pair, even with margin 0
                provenance = _provenance(i, j, gold_index)
            else:
                continue
            pairs.append({"chosen": i, "rejected": j, "provenance": provenance, "margin": gap})
    return pairs


def teacher_pairs(P, gold_index, defective=None):
    """DNO-Restrictive (Sec. 5.2, Table 1): only pairs whose y+ is the gold, one per sample the judge
    prefers it to, P[gold][j] > 1/2, with no margin floor (departure 8); a defective sample is a
    negative whatever P says. margin = P[gold][j] - P[j][gold]. No gold: no pairs."""
    A = as_table(P)
    n = len(A)
    defective = [False] * n if defective is None else [bool(d) for d in defective]
    if gold_index is None:
        return []
    pairs = []
    for j in range(n):
        if j == gold_index or np.isnan(A[gold_index, j]):
            continue
        won = A[gold_index, j] > 0.5 + EPS
        if defective[j] or won:
            kind = "defect" if defective[j] else "gold>sample"
            gap = float(A[gold_index, j] - A[j, gold_index])
            pairs.append({"chosen": gold_index, "rejected": j, "provenance": kind, "margin": gap})
    return pairs


def spin_pairs(n, gold_index):
    """SPIN (Chen et al. 2024; the paper's Sec. 5.2): the gold is always y+ and every one of the
    n - 1 samples is y-, with no judge at all. No gold: no pairs."""
    if gold_index is None:
        return []
    return [{"chosen": gold_index, "rejected": j, "provenance": "gold>sample", "margin": None}
            for j in range(n) if j != gold_index]


def soft_target(r_a, r_b):
    """sigmoid(r_t(x, y_a) - r_t(x, y_b)): Alg. 1, line 4's regression target (Eq. 8), P(y_a
    preferred)."""
    p = 1 / (1 + np.exp(-(np.asarray(r_a, dtype=np.float64) - np.asarray(r_b, dtype=np.float64))))
    return float(p) if p.ndim == 0 else p


def all_pairs(r, defective=None, gold_index=None):
    """Every unordered pair of judged candidates (r_t not None/NaN), for Alg. 1's soft targets
    (departure 5): [{"chosen", "rejected", "provenance", "margin"}] in index order, r(chosen) >=
    r(rejected) (ties: lower index chosen), margin = r(chosen) - r(rejected) >= 0, so the target is
    sigmoid(margin). A defective candidate counts as r = 0 (provenance "defect"); two defective
    candidates are not paired."""
    s = [None if v is None or math.isnan(float(v)) else float(v) for v in r]
    defective = [False] * len(s) if defective is None else [bool(d) for d in defective]
    if len(defective) != len(s):
        raise ValueError(f"all_pairs: {len(defective)} defect flags for {len(s)} candidates")
    pairs = []
    for i in range(len(s)):
        for j in range(i + 1, len(s)):
            if s[i] is None or s[j] is None or (defective[i] and defective[j]):
                continue
            a, b = (0.0 if defective[i] else s[i]), (0.0 if defective[j] else s[j])
            c, d = (i, j) if (a >= b and not defective[i]) or defective[j] else (j, i)
            kind = "defect" if defective[i] or defective[j] else _provenance(c, d, gold_index)
            pairs.append({"chosen": c, "rejected": d, "provenance": kind, "margin": abs(a - b)})
    return pairs


# ----------------------------------------------------------------------------- replay

def replay_shares(first, n_previous):
    """The paper's replay shares, "30% from t-1, 15% from t-2, and so on": [first / 2**k for k <
    n_previous]. They sum to less than 2 * first, so first in [0, 0.5) keeps the current pairs a
    positive share."""
    if not 0 <= first < 0.5:
        raise ValueError(f"replay share must be in [0, 0.5) (the halving series sums to < 2 * share), got {first}")
    return [first / 2 ** k for k in range(n_previous)]


def replay(current, previous, seed, shares=None):
    """current + up to shares[k] of the final set drawn from previous[k] (previous[0] is iteration
    t-1); shares default: replay_shares(0.3, len(previous)) = 0.3, 0.15, ... (departure 3). With n =
    len(current) and S the sum of the shares, iteration t-1-k gives min(len(previous[k]),
    round(shares[k] * n / (1 - S))) items, so without caps the shares hold exactly in the final set.
    Deterministic given seed."""
    if shares is None:
        shares = replay_shares(0.3, len(previous))
    shares = [float(x) for x in shares][:len(previous)]
    if any(x < 0 for x in shares) or sum(shares) >= 1:
        raise ValueError(f"replay: shares must be >= 0 and sum below 1, got {shares}")
    rng = random.Random(seed)
    n, rest = len(current), 1.0 - sum(shares)
    out = list(current)
    for share, old in zip(shares, previous):
        k = min(len(old), round(share * n / rest))
        out.extend(old[i] for i in sorted(rng.sample(range(len(old)), k)))
    return out


# ----------------------------------------------------------------------------- extension 1
# A regularised reference. The paper's Appendix A (Algorithm 3, after Nash-MD, Munos et al. 2023,
# arXiv 2312.00886) regularises the game towards a reference policy mu with weight tau. The update of
# Alg. 1, line 4 (Eq. 9) then starts from the smoothed policy
#
#   pi_t^mu(y|x) = pi_t(y|x)^(1 - beta) * mu(y|x)^beta / Z(x),        beta = tau / eta
#   pi_{t+1}(y|x) = pi_t^mu(y|x) * exp(r_t(x, y) / eta) / Z'(x)
#
# so the loss (dno_loss) keeps its form with pi_t^mu in place of pi_t as the reference: Z(x) is the
# same for both answers of a pair and cancels in h. With mu = pi_1 (train.py --ref_mix beta):
#
#   log ref(y|x) = (1 - beta) * log pi_t(y|x) + beta * log pi_1(y|x)        (up to log Z(x))
#
# This is Algorithm 3 with its Option I; the paper analyses it for convergence on average, not of
# the last iterate. Departure (ours): r_t is still estimated from pi_t's samples; Nash-MD samples
# the opponent from pi_t^mu.
def geometric_reference(logp_t, logp_1, beta):
    """log pi_t^mu(y|x) + log Z(x) of the smoothed reference above: (N,) from (N,) log pi_t and log
    pi_1."""
    if not 0 <= beta <= 1:
        raise ValueError(f"geometric_reference: beta must be in [0, 1], got {beta}")
    return (1 - beta) * logp_t + beta * logp_1                 # (N,)


# ----------------------------------------------------------------------------- extension 2
# Optimism (optimistic multiplicative weights, Rakhlin & Sridharan 2013; Daskalakis & Panageas 2019:
# its last iterate converges in zero-sum games with a unique equilibrium): tilt by 2 r_t - r_{t-1}
#
#   pi_{t+1}(y|x) ~ pi_t(y|x) * exp( (2 r_t(x, y) - r_{t-1}(x, y)) / (2 eta) ),  r_0 = 0
#
# r_{t-1}(y) = P(y > pi_{t-1}) is not judged for this iteration's candidates, but every past tilt is
# in the iterates: log pi_{k+1} - log pi_k = (2 r_k - r_{k-1}) / (2 eta) (+ a constant), so
# r_{t-1} / (2 eta) = sum_{j>=1} 2^-j (log pi_{t-j+1} - log pi_{t-j}). Moved into the reference,
# the update is Alg. 1, line 4's with target r_t / eta and
#
#   log ref(y|x) = 1/2 log pi_t + 1/4 log pi_{t-1} + ... + 2^-(t-1) log pi_2 + 2^-(t-1) log pi_1
#
# a geometric mixture of the past iterates, halving (tests/test_tabular.py: exactly OMWU). Departure
# (ours): train.py --optimistic N keeps the newest N iterates, the oldest kept one taking the rest of
# the weight; on a model each pi_{k+1} is the regression's fit, not the exact tilt. With --ref_mix
# beta too, log ref = (1 - beta) * this + beta * log pi_1: a magnet toward pi_1 (as in magnetic mirror
# descent) that keeps a style the samples stopped showing from vanishing (docs/experiments.md).
def optimistic_reference(logps):
    """log ref(y|x) above from [log pi_t, log pi_{t-1}, ...] (newest first, each (N,)) -> (N,)."""
    if not logps:
        raise ValueError("optimistic_reference: needs log pi_t at least")
    w = [2.0 ** -(j + 1) for j in range(len(logps))]
    w[-1] += 1.0 - sum(w)                                      # the oldest kept: the rest
    return sum(wj * lp for wj, lp in zip(w, logps))            # (N,)


# ----------------------------------------------------------------------------- demo

@dataclass
class Config:
    candidates: int = 6        # K+1 responses to one prompt; the last one is the gold
    eta: float = 0.1           # eta of the loss (Alg. 1's learning rate; DPO's beta in Alg. 2)
    seed: int = 0              # seed of the random judge table and the policy's log-ratios


def main(cfg):
    """One prompt's K+1 candidates under a general (possibly cyclic) judge: r_t, the pairs of Alg.
    2 (hard) and Alg. 1 (soft), and the loss at three policies (a table's cycles and BT fit: python
    preferences.py)."""
    if cfg.candidates < 2 or cfg.eta <= 0:
        raise ValueError(f"need --candidates >= 2 and --eta > 0, got {cfg.candidates}, {cfg.eta}")
    rng = np.random.default_rng(cfg.seed)
    n, gold = cfg.candidates, cfg.candidates - 1
    A = np.triu(rng.uniform(-1, 1, (n, n)), 1)
    P = 0.5 + (A - A.T) / 2                                     # (n, n), P + P^T = 1
    P[gold, :gold] = np.maximum(P[gold, :gold], 0.7)            # the gold wins most comparisons
    P[:gold, gold] = 1 - P[gold, :gold]
    r = winrates(P)                                             # (n,) r_t, Alg. 2 line 5
    print(f"config: {cfg}")
    print("P(y_i > y_j):\n" + np.array2string(P, precision=2))
    print("r_t (win-rates):", np.round(r, 3).tolist())
    hard = select_pairs(r, gold, kind="winrate")                # Alg. 2 line 6, target 1
    soft = all_pairs(r, gold_index=gold)                        # Alg. 1, line 4, sigmoid(dr_t)
    print(f"pairs: {len(hard)} large-margin (Alg. 2), {len(soft)} all (Alg. 1)")
    # log pi/pi_t per candidate (n,): pi = pi_t, a random move, and Alg. 1's ideal update r_t / eta
    policies = {"pi = pi_t": np.zeros(n), "random move": rng.normal(0, 1, n),
                "pi_t exp(r_t/eta)": r / cfg.eta}
    for name, logratio in policies.items():
        row = []
        for kind, pairs in (("hard", hard), ("soft", soft)):
            if not pairs:
                row.append(f"{kind} -")
                continue
            a = torch.tensor([logratio[p["chosen"]] for p in pairs])      # (N,)
            b = torch.tensor([logratio[p["rejected"]] for p in pairs])    # (N,)
            target = 1.0
            if kind == "soft":
                target = torch.tensor(soft_target([r[p["chosen"]] for p in pairs],
                                                  [r[p["rejected"]] for p in pairs]))
            zero = torch.zeros_like(a)
            losses, _ = dno_loss(a, b, zero, zero, target, cfg.eta)
            row.append(f"{kind} {losses.mean().item():.4f}")
        print(f"loss at {name:<18}: " + ", ".join(row))
    print("the soft loss is least at pi_t exp(r_t / eta) (Eq. 8's optimum is Eq. 9's update)")


# -----------------------------------------------------------------------------
def sequence_logps(logits, targets, mask):
    """log pi(y | x) = sum_t log pi(y_t | x, y_<t) over positions where mask == 1 (the response).

    The slow, obviously-correct reference (and batch_logps' test oracle): full (B, T, V) logits.
    logits (B, T, V) already aligned with targets (B, T): logits[:, t] predicts targets[:, t]
    (callers pass model(idx)[:, :-1] and idx[:, 1:]). mask (B, T) is 0 on prompt and padding.
    Returns (B,) float32. Only the target's log-prob is formed: logit - logsumexp, no (B, T, V)
    log-softmax is kept.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2] or mask.shape != targets.shape:
        raise ValueError(f"sequence_logps: want logits (B,T,V), targets/mask (B,T); got "
                         f"{tuple(logits.shape)}, {tuple(targets.shape)}, {tuple(mask.shape)}")
    keep = mask.bool()                                                  # (B, T)
    # pad / -100 ids -> a safe index
    targets = torch.where(keep, targets, torch.zeros_like(targets))
    # no copy when already float32
    logits = logits.float()
    tok = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)         # (B, T) logit of the target
    tok = tok - torch.logsumexp(logits, dim=-1)                        # (B, T) log pi(y_t | ...)
    return torch.where(keep, tok, torch.zeros_like(tok)).sum(-1)       # (B,) sum, as the paper


def autocast(device, dtype=None):
    """dtype None: bf16 autocast on CUDA, none elsewhere; False: none; a dtype autocasts on any
    device (CPU too)."""
    device = torch.device(device)
    if dtype is False:
        return nullcontext()
    if dtype is None and device.type != "cuda":
        return nullcontext()
    if dtype is None:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, dtype=dtype)


def batch_logps(model, seqs, device, autocast_dtype=None):
    """log pi(y | x) summed over response tokens for [(prompt_ids, response_ids)] -> (logp (B,),
    n_tokens). The fast twin of sequence_logps, tested against it (tests/test_logps.py): one
    right-padded batch; the vocab projection + log-softmax run on the N response positions only,
    fused (model.HeadLogp), so no (B, T, V) logits exist. n_tokens counts prompt and response tokens
    (for throughput logs)."""
    if not seqs or any(len(p) < 1 for p, _ in seqs):
        raise ValueError("batch_logps: need at least one sequence, each with a non-empty prompt")
    T = max(len(p) + len(r) for p, r in seqs)
    # (B, T), pad id 0 is masked out
    idx = torch.zeros(len(seqs), T, dtype=torch.long)
    # (B, T-1) over next-token targets
    mask = torch.zeros(len(seqs), T - 1, dtype=torch.bool)
    for i, (p, r) in enumerate(seqs):
        idx[i, :len(p) + len(r)] = torch.tensor(list(p) + list(r))
        # targets that are response tokens
        mask[i, len(p) - 1:len(p) + len(r) - 1] = True
    idx, sel = idx.to(device), mask.to(device)
    with autocast(device, autocast_dtype):
        # (N,) log pi(y_t | x, y_<t), float32
        tok = model(idx[:, :-1], select=sel, targets=idx[:, 1:][sel])
    # (B, T-1) -> (B,) sum, as the paper
    logp = tok.new_zeros(sel.shape).masked_scatter(sel, tok).sum(-1)
    return logp, sum(len(p) + len(r) for p, r in seqs)


def pair_logps(model, pairs, device, autocast_dtype=None):
    """Stored pairs {"prompt_tokens", "chosen_tokens", "rejected_tokens"} -> (log pi(y+|x) (m,), log
    pi(y-|x) (m,), n_tokens): both sides in one batch_logps call (one right-padded forward)."""
    seqs = [(p["prompt_tokens"], p[f"{side}_tokens"]) for side in ("chosen", "rejected")
            for p in pairs]
    logp, n = batch_logps(model, seqs, device, autocast_dtype)                 # (2m,)
    return logp[:len(pairs)], logp[len(pairs):], n


if __name__ == "__main__":
    try:
        main(cli(Config))
    except ValueError as e:
        sys.exit(f"error: {e}")

"""tabular.py: Algorithm 1 run exactly on a small tabular game, beside a Bradley-Terry baseline.

Usage:
    python tabular.py                             # Alg. 1 on an intransitive game (CPU, seconds)
    python tabular.py --eta 0.5 --iters 3000 --log_every 100
    python -m experiments.tabular --methods true  # + last iterates: optimism, --ref_mix, Nash-MD
    python -m pytest -q tests/test_tabular.py     # the checks, CPU, seconds

    from experiments.tabular import cyclic_game, run_tabular, exploitability
    P, pi_1 = cyclic_game()                       # (n, n) P(action i > action j), the "SFT" policy
    hist, r_bt, pi_last = run_tabular(P, pi_1, eta=0.1, iters=1000)   # hist[-1]["avg"] < 0.01

With the game known exactly there is nothing to estimate: Alg. 1, line 3 is r_t = P pi_t and line 4's
target is the ideal update pi_{t+1} = pi_t exp(r_t / eta) / Z (Eq. 9), the update that line 4's regression
(dno.dno_loss with soft targets) reaches on a model (tests/test_alg1_model.py checks that). The
demo shows what the theory promises and what it does not: the average iterate converges to the Nash
policy, the last iterate cycles, and a Bradley-Terry reward (what RLHF fits) picks a pure action
that the cycle exploits. The notation is dno.py's glossary (eta, r_t, pi_t, exploitability).
last_iterate_table compares methods for a last iterate that converges: optimism (train.py
--optimistic, exactly optimistic multiplicative weights) settles, --ref_mix and Nash-MD's mixture
settle only with a small step (large eta), at a regularised equilibrium away from Nash.

Departures from the paper (deliberate, numbered):
    1. pi_1 is not uniform: cyclic_game's "SFT" policy (0.1 / 0.1 / 0.1 / 0.4 / 0.3) favours the
       dull actions; Alg. 1, line 1 starts from the uniform policy. Every later step is Alg. 1's
       exactly (r_t = P pi_t, pi_{t+1} = pi_t exp(r_t / eta) / Z).
    2. The Bradley-Terry baseline (evaluate.fit_bradley_terry) is run through the same exact
       update with the BT model's preferences in place of P. The average iterate is the uniform
       mean of pi_1..pi_{t+1}. Updates are done in log space so no action's mass rounds to 0.
"""
from dnolib.cli import early_help
if __name__ == "__main__":
    # --help before the heavy imports
    early_help(__file__)

import math
import sys
from dataclasses import dataclass

import numpy as np

from dnolib.cli import cli
from evaluate import fit_bradley_terry

ACTIONS = ["rock", "paper", "scissors", "bland", "rambling"]


def cyclic_game():
    """P[i, j] = P(action i > action j): weighted rock-paper-scissors plus two dominated actions.
    In 2P - 1 units: paper > rock by 0.4, rock > scissors by 0.8, scissors > paper by 1.0, so the
    Nash policy is (1, 0.8, 0.4, 0, 0) / 2.2. Scissors crushes the two dull actions, which makes it
    the Bradley-Terry favourite, yet rock exploits it by 0.4."""
    P = np.array([[0.50, 0.30, 0.90, 0.75, 0.70],
                  [0.70, 0.50, 0.00, 0.75, 0.70],
                  [0.10, 1.00, 0.50, 0.95, 0.95],
                  [0.25, 0.25, 0.05, 0.50, 0.60],
                  [0.30, 0.30, 0.05, 0.40, 0.50]])
    return P, np.array([0.1, 0.1, 0.1, 0.4, 0.3])               # (n, n) preferences, pi_1 ("SFT")


CYCLIC_NASH = np.array([1.0, 0.8, 0.4, 0.0, 0.0]) / 2.2        # the equilibrium of cyclic_game()


def random_game(n, rng):
    """A random general preference matrix: P = 1/2 + A/2 with A antisymmetric, entries in [-1,
    1]."""
    A = np.triu(rng.uniform(-1, 1, (n, n)), 1)
    return 0.5 + (A - A.T) / 2


def alg1_exact_step(P, log_pi, eta):
    """One exact iteration of Alg. 1 on a tabular game, in log space. Returns (log pi_{t+1},
    r_t)."""
    pi = np.exp(log_pi)
    # Alg. 1, line 3: r_t(y) = P(y > pi_t)
    r = P @ pi
    # Alg. 1, line 4's target (Eq. 9): pi_t exp(r_t / eta)
    z = log_pi + r / eta
    return z - (z.max() + np.log(np.exp(z - z.max()).sum())), r  # ... / Z


def exploitability(P, pi):
    """max over pure responses y of P(y > pi) - 1/2 (a best response to pi may be taken pure)."""
    return float((P @ pi).max() - 0.5)


def run_tabular(P, pi_1, eta, iters):
    """Alg. 1's exact update from pi_1 (departure 1), beside the same update driven by a
    Bradley-Terry fit of P (departure 2). Returns a history.

    What it shows on cyclic_game(): the average iterate converges to the Nash policy (exploitability
    < 0.01 within ~500 iterations at eta = 0.1), the last iterate of these multiplicative weights
    does not: it spirals out and cycles between near-pure policies (exploitability 0.2-0.5). The BT
    run converges to the argmax of a scalar reward, a pure policy, which the cycle always
    exploits."""
    r_bt = fit_bradley_terry(P)
    P_bt = 1 / (1 + np.exp(r_bt[None, :] - r_bt[:, None]))     # the transitive model BT can express
    log_pi = log_bt = np.log(pi_1)
    total = pi_1.copy()
    hist = []
    for t in range(1, iters + 1):
        pi_t = np.exp(log_pi)
        log_pi, r = alg1_exact_step(P, log_pi, eta)
        log_bt, _ = alg1_exact_step(P_bt, log_bt, eta)
        pi_next = np.exp(log_pi)
        total += pi_next
        hist.append({"t": t, "last": exploitability(P, pi_next),
                     "avg": exploitability(P, total / (t + 1)),
                     "bt": exploitability(P, np.exp(log_bt)),
                     "improve": float(pi_next @ P @ pi_t)})     # P(pi_{t+1} > pi_t) >= 1/2
    return hist, r_bt, np.exp(log_pi)


# ----------------------------------------------------------------------------- last iterates
def normalise(z):
    """log-softmax of a log-space policy (n,)."""
    return z - (z.max() + np.log(np.exp(z - z.max()).sum()))


def last_iterate_step(P, logs, log_pi1, method, eta, beta=0.0, keep=0):
    """One exact update by one method from the iterates so far (logs: log pi_1..log pi_t). -> log
    pi_{t+1}. plain: Alg. 1 (Eq. 9). optimistic: train.py --optimistic (dno.optimistic_reference:
    the reference mixes the last `keep` iterates, 0 = all, with halving weights), which is
    optimistic multiplicative weights pi_t exp((2 r_t - r_{t-1}) / (2 eta)) exactly. ref_mix:
    train.py --ref_mix beta (Alg. 3, Option I; magnetic mirror descent toward pi_1 with step
    1 / (eta (1 - beta)) and magnet strength beta eta). nash_md: the same reference, and r_t taken
    against it (Nash-MD samples the opponent from the mixture)."""
    log_pi = logs[-1]
    if method == "plain":
        ref, opponent = log_pi, log_pi
    elif method == "optimistic":
        past = logs[::-1][:keep or len(logs)]                 # log pi_t, log pi_{t-1}, ...
        w = [2.0 ** -(j + 1) for j in range(len(past))]
        w[-1] += 1.0 - sum(w)
        ref, opponent = sum(wj * lp for wj, lp in zip(w, past)), log_pi
        ref = (1 - beta) * ref + beta * log_pi1              # with --ref_mix beta: toward pi_1
    elif method in ("ref_mix", "nash_md"):
        ref = normalise((1 - beta) * log_pi + beta * log_pi1)
        opponent = ref if method == "nash_md" else log_pi
    else:
        raise ValueError(f"unknown method {method!r}")
    r = P @ np.exp(opponent)                                  # r_t(y) = P(y > opponent)
    return normalise(ref + r / eta)


def run_method(P, pi_1, method, eta, iters, beta=0.0, keep=0):
    """Exploitability of the last and of the average iterate after each of iters updates."""
    logs, total, hist = [np.log(pi_1)], pi_1.copy(), []
    for t in range(1, iters + 1):
        logs.append(last_iterate_step(P, logs, logs[0], method, eta, beta, keep))
        total += np.exp(logs[-1])
        hist.append({"t": t, "last": exploitability(P, np.exp(logs[-1])),
                     "avg": exploitability(P, total / (t + 1))})
    return hist


# the methods the last-iterate table compares: (name, method, eta, beta, keep)
METHODS = [("plain DNO (Alg. 1)", "plain", 0.1, 0.0, 0), ("plain DNO", "plain", 0.2, 0.0, 0),
           ("--ref_mix 0.5 (Alg. 3, I)", "ref_mix", 0.1, 0.5, 0),
           ("--ref_mix 0.05", "ref_mix", 1.0, 0.05, 0),
           ("Nash-MD, beta 0.5", "nash_md", 0.1, 0.5, 0), ("Nash-MD, beta 0.05", "nash_md", 1.0, 0.05, 0),
           ("--optimistic (all)", "optimistic", 0.2, 0.0, 0),
           ("--optimistic 6", "optimistic", 0.2, 0.0, 6),
           ("--optimistic (all)", "optimistic", 0.1, 0.0, 0),
           ("--optimistic 6 --ref_mix 0.05", "optimistic", 0.2, 0.05, 6),
           ("--optimistic 6 --ref_mix 0.2", "optimistic", 0.2, 0.2, 6)]


def last_iterate_table(iters=1000, marks=(8, 16, 32, 100, 1000)):
    """Markdown: last-iterate exploitability of every METHODS entry at the marks, and the average
    iterate's at the end."""
    P, pi_1 = cyclic_game()
    marks = [m for m in marks if m <= iters]
    head = ["method", "eta", "beta", "kept"] + [f"last, t = {m}" for m in marks] + ["average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, method, eta, beta, keep in METHODS:
        h = run_method(P, pi_1, method, eta, iters, beta, keep)
        cells = [name, f"{eta:g}", f"{beta:g}", str(keep or "all")]
        cells += [f"{h[m - 1]['last']:.4f}" for m in marks] + [f"{h[-1]['avg']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- demo

@dataclass
class Config:
    eta: float = 0.1           # learning rate of Alg. 1, line 4's target (Eq. 9) (0.1: the authors' DPO beta)
    iters: int = 1000          # T, iterations of Alg. 1
    log_every: int = 50        # print one line every this many iterations (1 = every iteration)
    methods: bool = False      # also print the last-iterate table (optimism, --ref_mix, Nash-MD)


def main(cfg):
    if not 0 < cfg.eta < math.inf or cfg.iters < 1 or cfg.log_every < 1:  # nan fails 0 < eta too
        raise ValueError(f"need a finite --eta > 0, --iters >= 1, --log_every >= 1 (got --eta "
                         f"{cfg.eta})")
    P, pi_1 = cyclic_game()
    hist, r_bt, pi_last = run_tabular(P, pi_1, cfg.eta, cfg.iters)
    print(f"config: {cfg}")
    best = int(np.argmax(r_bt))
    worst_case = exploitability(P, np.eye(len(P))[best])
    print("actions:", ", ".join(ACTIONS), "| Bradley-Terry rewards:", np.round(r_bt, 3).tolist(),
          f"| BT-optimal policy: all mass on {ACTIONS[best]}, exploitability {worst_case:.4f}")
    print(f"exploitability at start (pi_1): {exploitability(P, pi_1):.4f}")
    print(f"{'iter':>6} {'last iterate':>13} {'average':>10} {'BT-reward':>10} "
          f"{'P(pi_t+1 > pi_t)':>17}")
    for h in hist:
        if h["t"] % cfg.log_every == 0 or h["t"] in (1, 2, 5, 10):
            print(f"{h['t']:6d} {h['last']:13.4f} {h['avg']:10.4f} {h['bt']:10.4f} "
                  f"{h['improve']:17.4f}")
    print("last iterate pi_T+1:", np.round(pi_last, 3).tolist(), "| Nash:",
          np.round(CYCLIC_NASH, 3).tolist())
    f = hist[-1]
    print(f"final exploitability after {cfg.iters} iterations: average iterate {f['avg']:.4f}, "
          f"last iterate {f['last']:.4f}, BT-reward baseline {f['bt']:.4f}")
    if cfg.methods:
        print("last-iterate exploitability by method:\n" + last_iterate_table(cfg.iters))


if __name__ == "__main__":
    try:
        main(cli(Config))
    except ValueError as e:
        sys.exit(f"error: {e}")

"""Diagnostics of general preferences: cycles, a Bradley-Terry fit, Copeland scores, and whether
the BT and Copeland rankings disagree, over one prompt's judged table.

    python preferences.py      # demo: rock-paper-scissors (a cycle) vs a transitive table
    python -m pytest -q tests/test_preferences.py

    from preferences import has_cycle, fit_bt_table, copeland, ranking_disagrees, diagnostics
    has_cycle(P)           # P (n, n): P[i, j] = P(y_i > y_j | x), None / NaN = not judged
    r = fit_bt_table(P)    # (n,) Bradley-Terry rewards, NaN for never-judged candidates
    diagnostics([P, ...])  # {"n", "cycle_share", "bt_disagreement_share"}: shares over prompts

DNO's case is that a general preference P need not come from any scalar reward: it may be cyclic
(dno.py's glossary). These functions measure how far the judge's tables are from what a scalar
reward (Bradley-Terry) can express: iteration.py records diagnostics(tables) in each pairs stage's
summary ("preferences"), and tabular.py's Bradley-Terry baseline is fit_bradley_terry. The win-rates
r_t (dno.winrates) are the Borda scores of the same tables.

Departures from the paper (deliberate, numbered):
    1. The diagnostics (has_cycle, copeland, ranking_disagrees: BT vs Copeland, diagnostics) are
       ours; the paper reports none.
    2. fit_bradley_terry (the diagnostics' BT fit; tabular.py's baseline) fits its scalar reward
       by maximum likelihood on all judged pairs weighted equally, with a 1e-3 L2 penalty so the
       fit is finite.
"""
import numpy as np

from dno import as_table, winrates


def has_cycle(P, tol=1e-9):
    """An intransitive triple i > j > k > i, each preference strictly above 1/2 (+ tol)."""
    W = (np.nan_to_num(as_table(P), nan=0.5) > 0.5 + tol).astype(np.int64)    # (n, n) strict wins
    # a directed 3-cycle closes a walk of length 3
    return bool(np.trace(W @ W @ W) > 0)


def fit_bradley_terry(P, l2=1e-3, steps=3000, lr=0.5):
    """Scalar rewards r maximising 1/2 sum_{i != j} P[i, j] log sigmoid(r_i - r_j) - l2/2 |r|^2
    (departure 2); NaN entries (not judged) are left out of the sum."""
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
    # rock-paper-scissors (0 > 1 > 2 > 0), a transitive table (0 > 1 > 2), and one where y0
    # narrowly wins two majorities but loses y3 badly: Copeland ranks y0 first, BT last
    tables = {"rock-paper-scissors": [[0.5, 0.9, 0.2], [0.1, 0.5, 0.7], [0.8, 0.3, 0.5]],
              "transitive": [[0.5, 0.7, 0.9], [0.3, 0.5, 0.6], [0.1, 0.4, 0.5]],
              "lopsided": [[0.5, 0.55, 0.55, 0.05], [0.45, 0.5, 0.5, 0.55],
                           [0.45, 0.5, 0.5, 0.55], [0.95, 0.45, 0.45, 0.5]]}
    for name, P in tables.items():
        print(f"{name}: has_cycle {has_cycle(P)}, ranking_disagrees {ranking_disagrees(P)}")
        print(f"    BT fit   {(np.round(fit_bt_table(P), 3) + 0.0).tolist()}")   # + 0.0: no -0.0
        print(f"    Copeland {copeland(P).tolist()}")
    print("diagnostics:", diagnostics(list(tables.values())))

"""Tests for preferences.py: cycles, the Bradley-Terry fit, Copeland scores and their disagreement
on hand tables, the diagnostics' shares over prompts."""
import numpy as np
import pytest

from experiments import tabular
from dno import table_from_scores, winrates
from evaluate import copeland, diagnostics, fit_bt_table, has_cycle, ranking_disagrees

RPS = [[0.5, 0.9, 0.2], [0.1, 0.5, 0.7], [0.8, 0.3, 0.5]]   # 0 > 1 > 2 > 0: rock-paper-scissors


def test_cycles():
    assert has_cycle(RPS)
    assert has_cycle(tabular.cyclic_game()[0])
    assert not has_cycle([[0.5, 0.9, 0.2], [0.1, 0.5, 0.5], [0.8, 0.5, 0.5]])    # a tie breaks it
    # unjudged: no evidence
    assert not has_cycle([[0.5, 0.9, None], [0.1, 0.5, 0.7], [None, 0.3, 0.5]])
    assert has_cycle([[0.5, 0.5 + 2e-9, 0], [0.5 - 2e-9, 0.5, 1], [1, 0, 0.5]])
    assert not has_cycle([[0.5, 0.5 + 2e-9, 0], [0.5 - 2e-9, 0.5, 1], [1, 0, 0.5]], tol=1e-6)
    rng = np.random.default_rng(0)
    for _ in range(20):                          # rubric tables are transitive by construction
        scores = [None if rng.random() < 0.1 else int(rng.integers(0, 7)) for _ in range(6)]
        P = table_from_scores(scores)
        assert not has_cycle(P) and not ranking_disagrees(P)
        w, r = winrates(P), fit_bt_table(P)      # the BT fit itself keeps the Borda order
        ok = ~np.isnan(w)
        assert np.isnan(r[~ok]).all()
        wi, ri = w[ok], r[ok]
        assert not ((wi[:, None] > wi[None, :] + 1e-9) & (ri[:, None] < ri[None, :] - 1e-9)).any()


def test_bt_ranking_disagrees_with_copeland():
    # y0 narrowly wins its majorities against y1 and y2 (0.55) but loses y3 badly (0.05): Copeland
    # ranks y0 first (2 wins), while BT (= the win-rates on a complete table) ranks it last (0.383)
    # and y3 first (0.617).
    P = [[0.5, 0.55, 0.55, 0.05], [0.45, 0.5, 0.5, 0.55], [0.45, 0.5, 0.5, 0.55],
         [0.95, 0.45, 0.45, 0.5]]
    assert np.allclose(copeland(P), [2, 1.5, 1.5, 1])
    assert np.allclose(winrates(P), [0.383333, 0.5, 0.5, 0.616667])
    assert ranking_disagrees(P) and has_cycle(P)        # (y0 > y1 > y3 > y0)
    assert not ranking_disagrees(RPS)                   # a pure cycle: every Copeland score ties
    # incomplete tables are fitted: y0 beat a weak y2 (0.9), y1 narrowly beat a strong y3 (0.6); BT
    # puts y1 above y0, Borda the reverse; Copeland ties y0, y1, y3 (one win each), so it disagrees
    # with neither strictly
    n = None
    Q = [[0.5, n, 0.9, n], [n, 0.5, n, 0.6], [0.1, n, 0.5, 0.01], [n, 0.4, 0.99, 0.5]]
    w, r = winrates(Q), fit_bt_table(Q)
    assert np.allclose(w, [0.9, 0.6, 0.055, 0.695]) and r[0] < r[3] < r[1] and r[2] == r.min()
    assert not ranking_disagrees(Q)
    # on complete tables BT keeps the Borda order (see ranking_disagrees): check it on random ones
    rng = np.random.default_rng(1)
    for _ in range(20):
        G = tabular.random_game(int(rng.integers(3, 7)), rng)
        assert (np.argsort(winrates(G)) == np.argsort(fit_bt_table(G))).all()
    d = diagnostics([RPS, table_from_scores([6, 4, 4]), P])
    assert d == {"n": 3, "cycle_share": pytest.approx(2 / 3),
                 "bt_disagreement_share": pytest.approx(1 / 3)}
    assert diagnostics([]) == {"n": 0, "cycle_share": None, "bt_disagreement_share": None}

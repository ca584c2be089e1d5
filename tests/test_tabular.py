"""Tests for tabular.py: Alg. 1 run exactly on a tabular game (the average iterate reaches Nash, the
last one cycles, a Bradley-Terry reward stays exploitable, every step improves on the last), the demo."""
import re

import numpy as np
import pytest

import evaluate
from experiments import tabular


def test_cyclic_game_average_converges_last_iterate_circles():
    P, pi_1 = tabular.cyclic_game()
    assert np.allclose(P + P.T, 1) and abs(tabular.exploitability(P, tabular.CYCLIC_NASH)) < 1e-12
    assert min(tabular.exploitability(P, e) for e in np.eye(5)) >= 0.2 - 1e-12   # no pure equilibrium: a real cycle
    hist, _, _ = tabular.run_tabular(P, pi_1, eta=0.1, iters=1000)
    assert hist[-1]["avg"] < 0.01
    # multiplicative weights' last iterate does not settle: it keeps visiting exploitable near-pure policies
    assert max(h["last"] for h in hist[-200:]) > 0.4 and np.mean([h["last"] for h in hist[-200:]]) > 0.1


def test_bt_baseline_stays_exploitable():
    P, pi_1 = tabular.cyclic_game()
    r = evaluate.fit_bradley_terry(P)
    assert int(np.argmax(r)) == 2                                 # scissors, beaten by rock by 0.4
    hist, _, _ = tabular.run_tabular(P, pi_1, eta=0.1, iters=300)
    assert min(h["bt"] for h in hist[-100:]) > 0.35
    # sanity: on transitive (Bradley-Terry) data the fit recovers the rewards
    true = np.array([1.0, 0.0, -0.5, -0.5])
    r = evaluate.fit_bradley_terry(1 / (1 + np.exp(true[None, :] - true[:, None])), l2=0.0)
    assert np.allclose(r, true - true.mean(), atol=1e-3)


def test_monotonic_improvement_on_random_games():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(2, 9))
        P = tabular.random_game(n, rng)
        assert np.allclose(P + P.T, 1)
        log_pi = np.log(rng.dirichlet(np.ones(n)))
        eta = [0.05, 0.1, 1.0][trial % 3]
        for _ in range(40):
            pi_t = np.exp(log_pi)
            log_pi, r = tabular.alg1_exact_step(P, log_pi, eta)
            assert pi_t @ r == pytest.approx(0.5)                   # P(pi_t > pi_t) = 1/2
            assert np.exp(log_pi) @ P @ pi_t >= 0.5 - 1e-12        # P(pi_{t+1} > pi_t) >= 1/2


def test_demo_prints_final_exploitability(capsys):
    tabular.main(tabular.Config(iters=600, log_every=200))
    lines = capsys.readouterr().out.strip().splitlines()
    final = [ln for ln in lines if "exploitability" in ln][-1]
    assert float(re.search(r"average iterate ([0-9.]+)", final).group(1)) < 0.01
    assert float(re.search(r"BT-reward baseline ([0-9.]+)", final).group(1)) > 0.35
    assert tabular.cli(tabular.Config, ["--eta", "0.5", "--iters", "7"]) == tabular.Config(eta=0.5, iters=7)
    with pytest.raises(ValueError):
        tabular.main(tabular.Config(eta=0.0))

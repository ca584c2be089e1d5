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


def omwu(P, pi_1, eta, iters):
    """Optimistic multiplicative weights written directly: pi_{t+1} ~ pi_t exp((2 r_t - r_{t-1}) /
    (2 eta)), r_0 = 0. -> [log pi_1, ..., log pi_{iters+1}]"""
    logs, r_prev = [np.log(pi_1)], np.zeros(len(pi_1))
    for _ in range(iters):
        r = P @ np.exp(logs[-1])
        logs.append(tabular.normalise(logs[-1] + (2 * r - r_prev) / (2 * eta)))
        r_prev = r
    return logs


def test_optimistic_reference_is_optimistic_multiplicative_weights():
    """train.py --optimistic's update (Alg. 1, line 4's target with dno.optimistic_reference: the
    past iterates mixed geometrically with halving weights) is OMWU exactly, on random games too;
    the torch function behind the flag gives the same reference."""
    import torch
    import dno
    rng = np.random.default_rng(1)
    for P, pi_1 in [tabular.cyclic_game()] + [(tabular.random_game(6, rng), rng.dirichlet(np.ones(6)))
                                               for _ in range(5)]:
        logs = [np.log(pi_1)]
        for _ in range(60):
            logs.append(tabular.last_iterate_step(P, logs, logs[0], "optimistic", eta=0.2))
        assert np.abs(np.array(logs) - np.array(omwu(P, pi_1, 0.2, 60))).max() < 1e-9
    past = [torch.tensor(lp) for lp in logs[::-1][:4]]             # newest first
    w = [0.5, 0.25, 0.125, 0.125]
    want = sum(wj * lp for wj, lp in zip(w, past))
    assert torch.allclose(dno.optimistic_reference(past), want, atol=1e-12)
    assert torch.equal(dno.optimistic_reference(past[:1]), past[0])   # t = 1: pi_1 itself


def test_optimistic_last_iterate_converges_where_plain_dno_cycles():
    """On cyclic_game, exact updates: plain DNO's last iterate still cycles after 1000 iterations
    (exploitability up to 0.5), the optimistic one (eta 0.2, all iterates or the last 6) is below
    0.02 from t = 64 on and its average still converges; --ref_mix 0.5 at eta 0.1 (Alg. 3,
    Option I) does not settle."""
    P, pi_1 = tabular.cyclic_game()
    plain = tabular.run_method(P, pi_1, "plain", 0.1, 1000)
    assert max(h["last"] for h in plain[-200:]) > 0.4
    for keep in (0, 6):
        opt = tabular.run_method(P, pi_1, "optimistic", 0.2, 1000, keep=keep)
        assert max(h["last"] for h in opt[63:]) < 0.02 and opt[-1]["avg"] < 0.01
    bt = tabular.run_tabular(P, pi_1, 0.2, 1000)[0]   # the same update on a fitted BT reward
    assert min(h["bt"] for h in bt[63:]) > 0.3         # settles on the BT-optimal action: exploited
    both = tabular.run_method(P, pi_1, "optimistic", 0.2, 1000, beta=0.05, keep=6)  # + --ref_mix
    assert max(h["last"] for h in both[31:]) < 0.01   # pi_1's pull: the regularised equilibrium
    mix = tabular.run_method(P, pi_1, "ref_mix", 0.1, 1000, beta=0.5)
    assert max(h["last"] for h in mix[-200:]) > 0.1

"""Tests for dno.py: the loss, win-rates, pair selection, replay, the demo (the tabular theory:
test_tabular.py; log-probs: test_logps.py; diagnostics: test_preferences.py)."""
import math
import re

import numpy as np
import pytest
import torch

import dno

torch.set_num_threads(1)


def _loss(a, b, ra, rb, target, eta):
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    return dno.dno_loss(t(a), t(b), t(ra), t(rb), target, eta)


# ----------------------------------------------------------------------------- loss

def test_loss_at_hand_computed_points():
    # h = 0: -log sigmoid(0) = log 2 whatever the target
    losses, _ = _loss([0.0], [0.0], [0.0], [0.0], 1.0, 0.1)
    assert losses.item() == pytest.approx(math.log(2), abs=1e-12)
    # log-ratios +1 and -1, eta 0.5 -> h = 1; log(1 + e^-1) = 0.3132616875, log(1 + e) = 1.3132616875
    losses, stats = _loss([-3.0, -3.0], [-6.0, -6.0], [-4.0, -4.0], [-5.0, -5.0], torch.tensor([1.0, 0.25]), 0.5)
    assert losses[0].item() == pytest.approx(0.3132616875, abs=1e-9)
    assert losses[1].item() == pytest.approx(0.25 * 0.3132616875 + 0.75 * 1.3132616875, abs=1e-9)
    assert stats["margin"].item() == pytest.approx(1.0)
    assert stats["chosen_logratio"].item() == pytest.approx(1.0)
    assert stats["rejected_logratio"].item() == pytest.approx(-1.0)
    assert stats["accuracy"].item() == pytest.approx(0.5)      # target 0.25 wants h < 0: wrong side
    assert not any(v.requires_grad for v in stats.values())
    # hard target, wrong way round: h = -2 -> log(1 + e^2) = 2.1269280110
    losses, stats = _loss([0.0], [2.0], [0.0], [0.0], 1.0, 1.0)
    assert losses.item() == pytest.approx(2.1269280110, abs=1e-9)
    assert stats["accuracy"].item() == 0.0


def test_zero_gradient_when_both_sides_equal():
    theta = torch.tensor([0.3, -1.2], requires_grad=True)
    for target in (1.0, 0.7, 0.0):
        logp = (theta * torch.tensor([2.0, 1.0])).sum().reshape(1)   # the same response on both sides
        losses, _ = dno.dno_loss(logp, logp, torch.tensor([-0.5]), torch.tensor([-0.5]), target, 0.1)
        (g,) = torch.autograd.grad(losses.sum(), theta)
        assert torch.equal(g, torch.zeros(2))


def test_gradient_vanishes_at_the_ideal_update_alg1():
    # Alg. 1: target sigmoid(r_a - r_b); the optimum is eta * (logratio_a - logratio_b) = r_a - r_b
    eta, ra, rb = 0.1, 0.8, 0.35
    a = torch.tensor([ra / eta - 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([rb / eta - 2.0], dtype=torch.float64, requires_grad=True)
    losses, _ = dno.dno_loss(a, b, torch.tensor([-2.0]).double(), torch.tensor([-2.0]).double(),
                             torch.sigmoid(torch.tensor(ra - rb, dtype=torch.float64)), eta)
    ga, gb = torch.autograd.grad(losses.sum(), (a, b))
    assert abs(ga.item()) < 1e-12 and abs(gb.item()) < 1e-12


def test_gradient_sign():
    a = torch.tensor([-5.0, -1.0], requires_grad=True)
    b = torch.tensor([-2.0, -7.0], requires_grad=True)
    ref_a = torch.tensor([-4.0, -1.5], requires_grad=True)
    ref_b = torch.tensor([-3.0, -6.0], requires_grad=True)
    losses, _ = dno.dno_loss(a, b, ref_a, ref_b, 1.0, 0.1)
    losses.sum().backward()
    assert (a.grad < 0).all() and (b.grad > 0).all()            # push y+ up, y- down
    assert ref_a.grad is None and ref_b.grad is None            # pi_t is a constant
    a.grad = b.grad = None
    losses, _ = dno.dno_loss(a, b, ref_a, ref_b, 0.0, 0.1)       # target 0: b is preferred
    losses.sum().backward()
    assert (a.grad > 0).all() and (b.grad < 0).all()


def test_soft_target_is_label_smoothed_dpo():
    def smoothed_dpo(pa, pb, ra, rb, beta, eps):                # written independently, float64 math
        z = beta * ((pa - ra) - (pb - rb))
        log_sig = lambda x: -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))
        return -(1 - eps) * log_sig(z) - eps * log_sig(-z)
    g = torch.Generator().manual_seed(0)
    pa, pb, ra, rb = (torch.randn(64, generator=g, dtype=torch.float64) * 30 for _ in range(4))
    target = torch.rand(64, generator=g, dtype=torch.float64)
    for beta in (0.05, 0.1, 2.0):
        losses, _ = dno.dno_loss(pa, pb, ra, rb, target, beta)
        want = [smoothed_dpo(*map(float, v), beta, 1 - float(t)) for *v, t in zip(pa, pb, ra, rb, target)]
        assert torch.allclose(losses, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    # large margins stay finite (logsigmoid, not log(sigmoid))
    losses, _ = dno.dno_loss(torch.tensor([1e4]), torch.tensor([-1e4]), torch.zeros(1), torch.zeros(1), 0.0, 1.0)
    assert torch.isfinite(losses).all() and losses.item() == pytest.approx(2e4)


# ----------------------------------------------------------------------------- win-rates

def test_table_from_scores_and_winrates():
    P = dno.table_from_scores([6, 4, 4, None])
    assert np.array_equal(P[:3, :3], [[0.5, 1, 1], [0, 0.5, 0.5], [0, 0.5, 0.5]])
    assert np.isnan(P[3]).all() and np.isnan(P[:, 3]).all()
    w = dno.winrates(P)
    assert np.allclose(w[:3], [1.0, 0.25, 0.25]) and np.isnan(w[3])
    w = dno.winrates([[0.5, 0.9, None], [0.1, 0.5, 0.3], [None, 0.7, 0.5]])   # soft pairwise, one unknown
    assert np.allclose(w, [0.9, 0.2, 0.7])
    for bad in ([[0.5, 0.2]], [[0.5, 0.2], [0.8]]):
        with pytest.raises(ValueError):
            dno.winrates(bad)
    assert dno.winrates([]).shape == (0,)


def test_winrates_against_pi_t_samples_only():
    """opponents = pi_t's samples (train.py --opponents samples, Alg. 1 line 3): every candidate's
    r_t is its mean P against the samples (a sample's leave-one-out); the gold is no opponent."""
    P = [[0.5, 0.2, 0.9, 1.0],          # samples 0, 1, 2 and the gold (index 3)
         [0.8, 0.5, 0.4, 1.0],
         [0.1, 0.6, 0.5, 1.0],
         [0.0, 0.0, 0.0, 0.5]]
    assert np.allclose(dno.winrates(P, range(3)), [0.55, 0.6, 0.35, 0.0])
    assert np.allclose(dno.winrates(P), [0.7, 0.7333333, 0.5666667, 0.0])   # the gold counts
    assert np.allclose(dno.winrates(P, range(4)), dno.winrates(P))


# ----------------------------------------------------------------------------- pair selection

def _pairs(*a, **k):
    return [(p["chosen"], p["rejected"], p["provenance"], p["margin"]) for p in dno.select_pairs(*a, **k)]


def test_pairs_ties_all_equal_and_below_threshold():
    assert _pairs([5, 5, 5, 5], 0) == []                         # all equal: ties never pair
    assert _pairs([6, 6, 6], 1, sample_margin=0.0, margin=0.0) == []   # not even with margin 0
    assert _pairs([4, 1, 0, 2], 0) == []                         # best is 4 < 5: no positive
    assert _pairs([4.99, 0, 0], None) == []
    assert _pairs([None, None], 0) == [] and _pairs([], None) == []


def test_pairs_sample_beats_gold_and_margins():
    # gold (index 0) scores 4, below the bar; samples 6 and 5 beat it
    assert _pairs([4, 6, 5, 3], 0) == [
        (1, 0, "sample>gold", 2.0), (1, 2, "sample>sample", 1.0), (1, 3, "sample>sample", 3.0),
        (2, 0, "sample>gold", 1.0), (2, 3, "sample>sample", 2.0)]
    # >= 2 behind the gold, >= 1 behind a sample
    assert _pairs([6, 5, 4, 6], 0) == [
        (0, 2, "gold>sample", 2.0),                               # gold vs 5 (gap 1) is not enough
        (1, 2, "sample>sample", 1.0), (3, 1, "sample>sample", 1.0), (3, 2, "sample>sample", 2.0)]
    assert _pairs([5, 4], 0) == [] and _pairs([5, 3], 0) == [(0, 1, "gold>sample", 2.0)]
    assert _pairs([4, 5], 0) == [(1, 0, "sample>gold", 1.0)]


def test_pairs_defects_failures_and_winrates():
    # candidate 2 scores 6 but is degenerate: never positive, negative of every positive
    assert _pairs([6, 5, 6, 1], 0, [False, False, True, False]) == [
        (0, 2, "defect", 0.0), (0, 3, "gold>sample", 5.0), (1, 2, "defect", -1.0), (1, 3, "sample>sample", 4.0)]
    assert _pairs([6, None, 3, float("nan")], 0) == [(0, 2, "gold>sample", 3.0)]   # failed: never paired
    assert _pairs([6, None, 3], 0, [False, True, False]) == [(0, 2, "gold>sample", 3.0)]
    # win-rates among 6 strictly ranked candidates: .8, 1, .6, .4, .2, 0; the gold is column 0 (0.8)
    w = dno.winrates(dno.table_from_scores([5, 6, 4, 3, 2, 1]))
    assert np.allclose(w, [0.8, 1.0, 0.6, 0.4, 0.2, 0.0])
    got = _pairs(list(w), 0, kind="winrate")
    assert [(c, r, p) for c, r, p, _ in got] == [
        (0, 3, "gold>sample"), (0, 4, "gold>sample"), (0, 5, "gold>sample"),   # not (0, 2): 0.2 < 0.4
        (1, 0, "sample>gold"), (1, 2, "sample>sample"), (1, 3, "sample>sample"), (1, 4, "sample>sample"),
        (1, 5, "sample>sample"),                                   # one rank (0.2) suffices for a sample
        (2, 3, "sample>sample"), (2, 4, "sample>sample"), (2, 5, "sample>sample")]  # 0.6 is a positive
    assert got[0][3] == pytest.approx(0.4) and got[3][3] == pytest.approx(0.2)
    assert _pairs([0.59, 0.0], None, kind="winrate") == []      # below the 0.6 bar
    assert dno.select_pairs([4, 6, 5, 3], 0) == dno.select_pairs([4, 6, 5, 3], 0)   # pure, deterministic
    for bad in (dict(kind="elo"), dict(defective=[True])):
        with pytest.raises(ValueError):
            dno.select_pairs([6, 1], 0, **bad)
    with pytest.raises(ValueError):
        dno.select_pairs([6, 1], 2)


def test_is_defective():
    assert not dno.is_defective("")
    assert not dno.is_defective("2+3=5")
    text = ("Direct Nash Optimization trains a policy against a general preference oracle. Each iteration "
            "samples responses, asks the judge to compare them with the teacher's answer, and keeps the "
            "pairs with a large margin, so the model learns from its own best outputs.")
    assert not dno.is_defective(text)
    assert dno.is_defective("the answer is the answer is " * 8)
    assert dno.is_defective("7" * 40)
    assert dno.is_defective("Sure! " + "ha" * 30)
    assert not dno.is_defective("abcdefghijklmnopqrstuvwxyz0123456789")


def test_soft_target_and_all_pairs():
    assert dno.soft_target(0.5, 0.5) == 0.5
    assert dno.soft_target(0.8, 0.2) == pytest.approx(1 / (1 + math.exp(-0.6)), abs=1e-12)   # 0.6456563062
    assert np.allclose(dno.soft_target([1.0, 0.0], [0.0, 1.0]), [0.7310585786, 0.2689414214])
    got = [(p["chosen"], p["rejected"], p["provenance"], round(p["margin"], 9))
           for p in dno.all_pairs([0.4, 0.8, None, 0.4, float("nan")], gold_index=0)]
    assert got == [(1, 0, "sample>gold", 0.4), (0, 3, "gold>sample", 0.0), (1, 3, "sample>sample", 0.4)]
    # a defective candidate loses to every other (r counted as 0); two defective ones are not paired
    got = [(p["chosen"], p["rejected"], p["provenance"], round(p["margin"], 9))
           for p in dno.all_pairs([0.9, 0.3, 0.6, 0.2], [True, False, False, True])]
    assert got == [(1, 0, "defect", 0.3), (2, 0, "defect", 0.6), (2, 1, "sample>sample", 0.3),
                   (1, 3, "defect", 0.3), (2, 3, "defect", 0.6)]
    r = dno.winrates(dno.table_from_scores([6, 3, 5, 5]))
    pairs = dno.all_pairs(r)
    assert len(pairs) == 6 and all(r[p["chosen"]] >= r[p["rejected"]] and p["margin"] >= 0 for p in pairs)
    assert dno.all_pairs([]) == [] and dno.all_pairs([0.5]) == []
    with pytest.raises(ValueError):
        dno.all_pairs([0.5, 0.5], [True])


# ----------------------------------------------------------------------------- replay

def test_replay_shares_and_determinism():
    cur = [("t", i) for i in range(70)]
    prev = [[("t-1", i) for i in range(100)], [("t-2", i) for i in range(100)]]
    out = dno.replay(cur, prev, seed=3)
    assert out[:70] == cur
    n1, n2 = (sum(x[0] == k for x in out) for k in ("t-1", "t-2"))
    assert (n1, n2) == (38, 19)                                   # 0.3 and 0.15 of the 127 pairs
    assert n1 / len(out) == pytest.approx(0.3, abs=0.01) and n2 / len(out) == pytest.approx(0.15, abs=0.01)
    assert len(set(out)) == len(out)                              # without replacement
    assert dno.replay(cur, prev, seed=3) == out and dno.replay(cur, prev, seed=4) != out
    assert dno.replay(cur, [prev[0][:5]], seed=0)[70:] == prev[0][:5]   # "up to": capped by what exists
    assert dno.replay(cur, [], seed=0) == cur
    assert len(dno.replay(cur, prev, seed=0, shares=(0.3,))) == 70 + 30   # older iterations get 0
    with pytest.raises(ValueError):
        dno.replay(cur, prev, seed=0, shares=(0.7, 0.4))
    assert dno.replay_shares(0.3, 4) == [0.3, 0.15, 0.075, 0.0375] and dno.replay_shares(0.2, 0) == []
    assert sum(dno.replay_shares(0.49, 60)) < 1
    for bad in (0.5, -0.1, 1.0):
        with pytest.raises(ValueError, match="0.5"):
            dno.replay_shares(bad, 2)


# ----------------------------------------------------------------------------- the demo

def test_demo_soft_loss_is_least_at_alg1_ideal_update(capsys):
    dno.main(dno.Config(candidates=5, eta=0.5, seed=3))
    out = capsys.readouterr().out
    soft = [float(x) for x in re.findall(r"soft ([0-9.]+)", out)]
    assert len(soft) == 3 and soft[0] == pytest.approx(math.log(2), abs=1e-4)   # fresh: pi = pi_t
    assert soft[2] < min(soft[:2])                  # Eq. 8's optimum is Eq. 9's pi_t exp(r_t / eta)
    assert dno.cli(dno.Config, ["--candidates", "3"]) == dno.Config(candidates=3)
    with pytest.raises(ValueError):
        dno.main(dno.Config(candidates=1))

"""Table 1's ablations (--pairs restrictive / spin, offline DPO) and Table 2's columns: the pair
rules on hand-written tables, the statistics on hand-computed rows, --opponents samples reaching
--pairs margin, SPIN never asking the judge, and experiments/ablations.py run tiny (~30 s)."""
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest

import dno
import evaluate
import iteration
from experiments import ablations


# ----------------------------------------------------------------------------- the pair rules
def test_teacher_pairs_keep_only_gold_positives_without_a_margin():
    # rubric scores: samples 5, 4, 6, 5 and the gold 5 (index 4); sample 3 is defective
    P = dno.table_from_scores([5, 4, 6, 5, 5])
    pairs = dno.teacher_pairs(P, 4, [False, False, False, True, False])
    got = [(p["chosen"], p["rejected"], p["provenance"]) for p in pairs]
    # the gold beats sample 1 by one point (DNO's margin rule would need two): kept; ties (sample 0)
    # are not a preference; the defective sample 3 is a negative whatever its score
    assert got == [(4, 1, "gold>sample"), (4, 3, "defect")]
    assert pairs[0]["margin"] == 1.0
    margin = dno.select_pairs([5, 4, 6, 5, 5], 4, [False, False, False, True, False])
    assert (4, 1) not in [(p["chosen"], p["rejected"]) for p in margin]
    assert any(p["chosen"] != 4 for p in margin)     # DNO also keeps student positives
    assert dno.teacher_pairs(P, None) == []
    soft = [[0.5, 0.3, 0.6], [0.7, 0.5, 0.8], [0.4, 0.2, 0.5]]   # a pairwise judge, gold = 2
    assert [(p["chosen"], p["rejected"]) for p in dno.teacher_pairs(soft, 2)] == []
    assert [p["rejected"] for p in dno.teacher_pairs(soft, 0)] == [2]


def test_spin_pairs_put_the_gold_over_every_sample():
    pairs = dno.spin_pairs(6, 5)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(5, j) for j in range(5)]
    assert {p["provenance"] for p in pairs} == {"gold>sample"}
    assert dno.spin_pairs(6, None) == []


class Tok:
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [1 + len(w) for w in text.split()]

    def get_vocab(self):
        return {}


def stub_run(**cfg):
    return SimpleNamespace(cfg=SimpleNamespace(**cfg), tok=Tok(), context=64)


def test_opponents_samples_reach_the_margin_rule():
    """--opponents samples: a win-rate judge's margin pairs use r_t against pi_t's samples, the same
    r_t as the soft target (the hand-computed sets differ from the all-K+1 ones)."""
    P = np.array([[.5, 1, 1, 0], [0, .5, 1, 1], [0, 0, .5, 0], [1, 0, 1, .5]])   # gold = 3
    row = {"gold": "g", "prompt": "x", "prompt_tokens": [1]}
    s = {"id": "a", "samples": [{"text": w, "tokens": [2]} for w in ("a", "b", "c")]}
    res = {"P": P.tolist(), "scores": dno.winrates(P).tolist(), "score_kind": "winrate"}
    run = stub_run(pairs="margin")
    vs_samples = iteration.prompt_pairs(run, 1, row, s, res, dno.winrates(P, range(3)))
    vs_all = iteration.prompt_pairs(run, 1, row, s, res, dno.winrates(P))
    pick = lambda ps: sorted((p["chosen"], p["rejected"]) for p in ps)       # noqa: E731
    assert pick(vs_samples) == [(0, 1), (0, 2), (0, 3), (3, 2)]
    assert pick(vs_all) == [(0, 2), (1, 2), (3, 2)]


def test_spin_never_asks_the_judge(tmp_path):
    def judge(*a):
        raise AssertionError("SPIN paid the judge")
    run = SimpleNamespace(cfg=SimpleNamespace(pairs="spin"), out=str(tmp_path), fn=judge)
    assert iteration.judge_step(run, 1, [{"id": "a"}], str(tmp_path)) is None
    assert not os.path.exists(tmp_path / "iter_1")


# ----------------------------------------------------------------------------- Table 2
def test_annotation_stats_by_hand():
    P1 = dno.table_from_scores([6, 4, 5])         # 2 samples + gold: sample 0 beats the gold
    P2 = dno.table_from_scores([5, 5, 5])         # a tie with the gold is no win
    res = lambda P, sc: {"ok": True, "P": P.tolist(), "scores": sc, "score_kind": "rubric"}  # noqa
    seen = [(["a b c", "d"], res(P1, [6, 4, 5]), True),
            (["e f", "g h i j"], res(P2, [5, 5, 5]), True),
            (["k", "l m"], {"ok": False}, True)]           # failed: lengths count, scores do not
    a = evaluate.annotation_stats(seen, {"gold>sample": 3, "sample>gold": 1, "sample>sample": 2,
                                         "defect": 0, "replay": 4})
    words = [3, 1, 2, 4, 1, 2]
    assert a["inputs"] == 3 and a["judged"] == 2
    assert a["words_mean"] == pytest.approx(np.mean(words))
    assert a["words_sd"] == pytest.approx(np.std(words, ddof=1))
    assert a["best_of_n_vs_gold"] == 0.5 and a["student_wins_per_prompt"] == 0.5
    assert a["student_score"] == pytest.approx((6 + 4 + 5 + 5) / 4) and a["teacher_score"] == 5
    assert (a["T>S"], a["S>T"], a["S>S"], a["replayed"]) == (3, 1, 2, 4)
    text = evaluate.paper_table([{"iter": 0}, {"iter": 1, "table2": a}])
    assert "best-of-n vs T" in text and "2.2 +/-    1.2" in text and "rubric" in text


def test_paired_standard_error_by_hand():
    a = {1: (0.5, 3.0), 2: (1.0, 5.0), 3: (0.0, None)}
    b = {1: (0.25, 2.0), 2: (0.25, 4.0), 4: (1.0, 1.0)}
    m, se = ablations.paired(a, b, 0)              # units 1, 2: differences 0.25 and 0.75
    assert m == pytest.approx(0.5) and se == pytest.approx(np.std([.25, .75], ddof=1) / math.sqrt(2))
    assert ablations.paired(a, b, 1) == (pytest.approx(1.0), pytest.approx(0.0))


# ----------------------------------------------------------------------------- the experiment
def test_ablations_run_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "abl"
    T, n, val = 2, 12, 12
    units, rows = ablations.main(["--out", str(out), "--seeds", "0", "--iterations", str(T),
                                  "--prompts_per_iter", str(n), "--num_val", str(val),
                                  "--n_prompts", "60", "--sft_steps", "30",
                                  "--train", "--num_samples 3 --max_steps 2"])
    assert set(units) == {"pi_1", "dno", "restrictive", "spin", "offline"}
    for m, u in units.items():
        assert len(u) == val and all(v[0] is None or 0 <= v[0] <= 1 for v in u.values())
    spin = out / "s0" / "spin"
    assert not any((spin / f"iter_{t}" / "judgments").exists() for t in range(1, T + 1))
    assert (out / "s0" / "dno" / "iter_1" / "judgments" / "done").exists()
    t2 = {m: [r["table2"] for r in rows[m][0] if r.get("table2")] for m in rows}
    assert len(t2["dno"]) == len(t2["restrictive"]) == len(t2["spin"]) == T
    for a in t2["spin"]:                        # every sample a negative of the gold, no judge
        assert a["T>S"] == 3 * n and a["S>T"] == a["S>S"] == 0 and a["student_score"] is None
    for a in t2["restrictive"]:
        assert a["S>T"] == a["S>S"] == 0 and a["T>S"] + a["defect"] > 0
    assert len(t2["offline"]) == 1 and t2["offline"][0]["inputs"] == T * n
    assert t2["dno"][0]["inputs"] == n and t2["dno"][0]["best_of_n_vs_gold"] is not None
    text = (out / "ablations.md").read_text()
    for name in ("DNO (--pairs margin)", "DNO-Restrictive", "SPIN", "offline DPO", "SFT pi_1"):
        assert name in text

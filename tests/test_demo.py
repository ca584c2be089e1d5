"""demo_task.py and demo_sft.py: the rubric's degrees and ties, the cyclic judge, the teacher's designed error rate,
prepare's cache, and a reduced end-to-end `train.py` run on the demo (the issue's claims at small size).
The Bradley-Terry comparison's tests are in tests/test_compare_bt.py."""
import json
import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from demo import sft as ds  # noqa: E402
from demo import task as d  # noqa: E402

P = "sort: 4 1 3 0\n"


def test_rubric_degrees_and_ties():
    cases = {"0 1 3 4": 6, "0,1,3,4": 6, "0|1|3|4": 6,   # every style is a perfect answer: ties
             "0 1 4 3": 5,                               # one inversion
             "0 1 3 5": 5,                               # a wrong digit, still sorted
             "1 0 4 3": 5 - 1,                           # two inversions
             "4 3 1 0": 3,                               # six inversions: no order points
             "0 1,3 4": 5,                               # mixed separators: no format point
             "0 1 3": 1, "0 1 3 4 4": 1,                 # wrong count: format only
             "": 0, "hello": 0, " 0 1 3 4 ": 6}
    for y, want in cases.items():
        assert d.rubric(P, y) == want, y
    assert d.demo(P, list(cases))["scores"] == [float(v) for v in cases.values()]


def test_bad_prompt_is_a_value_error():
    with pytest.raises(ValueError, match="not a demo prompt"):
        d.rubric("write a poem", "0 1")


def test_cyclic_judge_cycles_and_is_swap_symmetric():
    a, b, c = "0 1 3 4", "0,1,3,4", "0|1|3|4"          # equally correct, three styles
    P3 = d.demo_cyclic(P, [a, b, c])["P"]
    assert P3[0][1] > 0.5 and P3[1][2] > 0.5 and P3[2][0] > 0.5   # " " > "," > "|" > " ": intransitive
    assert abs(P3[0][1] - 1 / (1 + 2.718281828 ** -1.5)) < 1e-6
    rng = random.Random(0)
    cands = [a, b, c, "0 1 4 3", "0,1,4,3", "1 3 4", "4|3|1|0", "junk"]
    Pn = d.demo_cyclic(P, cands)["P"]
    for i in range(len(cands)):
        assert Pn[i][i] == 0.5
        for j in range(len(cands)):
            assert abs(Pn[i][j] + Pn[j][i] - 1) < 1e-12     # P(a > b) + P(b > a) = 1
    perm = list(range(len(cands)))
    rng.shuffle(perm)
    Pp = d.demo_cyclic(P, [cands[k] for k in perm])["P"]   # the same table, whatever the candidate order
    assert all(abs(Pp[i][j] - Pn[perm[i]][perm[j]]) < 1e-12 for i in range(len(cands)) for j in range(len(cands)))
    assert d.pref(P, "0|1|4|3", a) < 0.5                   # correctness outweighs a winning style
    assert d.pref(P, "0 1 4 3", "0|1|3|4") < d.pref(P, "0 1 4 3", "0,1,3,4") < 0.5


def sigmoid(z):
    return 1 / (1 + 2.718281828459045 ** -z)


def test_rps_judge_is_antisymmetric_and_cycles_among_equally_correct_answers():
    cands = ["0 1 3 4", "0,1,3,4", "0|1|3|4", "0 1 4 3", "0,4,1,3", "0|1|3|5", "0 1,3 4", "1 3 4", "4|3|1|0", "junk"]
    Pn = d.demo_rps(P, cands)["P"]
    for i in range(len(cands)):
        assert Pn[i][i] == 0.5
        for j in range(len(cands)):
            assert abs(Pn[i][j] + Pn[j][i] - 1) < 1e-12     # P(a > b) + P(b > a) = 1
    win = sigmoid(3.0)
    # rubric 6, 6, 6, 5 (one inversion), 4 (two), 5 (a wrong digit): all equally correct, so the cycle decides
    assert [d.rubric(P, y) for y in cands[:6]] == [6, 6, 6, 5, 4, 5]
    for i in range(6):
        for j in range(6):
            a, b = d.style_of(cands[i]), d.style_of(cands[j])
            assert abs(Pn[i][j] - {1: win, -1: 1 - win, 0: 0.5}[d.cycle(a, b)]) < 1e-12, (cands[i], cands[j])
    assert d.pref_rps(P, "0,4,1,3", "0|1|3|4") > 0.95 > d.pref(P, "0,4,1,3", "0|1|3|4")   # demo_cyclic: rubric wins
    for bad in range(6, len(cands)):  # broken format, wrong count, 6 inversions: lose to every correct answer,
        assert all(Pn[bad][j] <= 1 - win + 1e-12 for j in range(6)), cands[bad]     # whatever their styles
    assert abs(d.pref_rps(P, "4|3|1|0", "0 1 3 4") - sigmoid(-6.0 + 3.0)) < 1e-12   # one point short: 0.05


def test_teacher_error_rate_is_as_designed():
    rng, n = random.Random(1), 20000
    errs = designed = eligible = eligible_errs = rotations = 0
    for _ in range(n):
        p = d.make_prompt(rng)
        y, s = d.teacher(p, rng), None
        s = d.rubric(p, y)
        assert s in (4, 5, 6) and d.style_of(y) is not None   # mistakes have degrees, never a broken format
        rate = d.teacher_error_rate(p)
        designed += rate
        errs += s < 6
        rotations += s == 4
        if rate:
            eligible += 1
            eligible_errs += s < 6
    assert abs(errs / n - designed / n) < 0.012
    assert abs(eligible_errs / eligible - d.P_TAIL) < 0.015
    assert abs(rotations / errs - d.P_ROTATE) < 0.03
    assert 0.3 < errs / n < 0.6                                # the teacher is wrong often enough to be beaten


def small_cfg(**kw):
    return ds.Config(**{"n_prompts": 24, "n_demos": 64, "sft_steps": 3, "sft_batch": 8, "dim": 32, "ffn": 64,
                       **kw})


def test_prepare_is_cached_and_loadable(tmp_path):
    torch.set_num_threads(1)
    out = str(tmp_path / "demo")
    logs = []
    m, p = ds.prepare(out, 0, small_cfg(), log=logs.append)
    stamp = os.path.getmtime(os.path.join(m, "model.safetensors"))
    assert any("SFT" in x for x in logs)
    logs.clear()
    assert ds.prepare(out, 0, small_cfg(), log=logs.append) == (m, p)
    assert os.path.getmtime(os.path.join(m, "model.safetensors")) == stamp and "reusing" in logs[0]
    rows = [json.loads(line) for line in open(p)]
    assert len(rows) == 24 and len({r["prompt"] for r in rows}) == 24
    assert all(set(r) == {"id", "prompt", "gold"} and d.rubric(r["prompt"], r["gold"]) >= 4 for r in rows)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(m)
    assert tok.decode(tok.encode(rows[0]["prompt"])) == rows[0]["prompt"]
    hf = AutoModelForCausalLM.from_pretrained(m)
    from dnolib.model import Transformer
    ours = Transformer.from_pretrained(m)
    idx = torch.tensor([tok.encode(rows[0]["prompt"])])
    assert torch.allclose(hf(idx).logits, ours(idx), atol=1e-4)
    ds.prepare(out, 0, small_cfg(sft_steps=4), log=logs.append)     # other settings: rebuilt
    assert os.path.getmtime(os.path.join(m, "model.safetensors")) != stamp or "reusing" not in logs[-1]


@pytest.mark.slow
def test_default_demo_run_shows_the_claims(tmp_path):
    """`python train.py` as the README runs it (built-in task, SFT, 200 greedy validation prompts), cut to its first
    two iterations (--iterations 2 --prompts_per_iter 266: the same validation prompts and slices D_1, D_2, so the
    same iterates as the default T = 3 run), with the threads train.py picks (1 for this model). Asserted, with
    margins in standard errors so that they hold on any CPU (the same code gives other figures on another
    processor; with 1 thread, iterations 1-2 reached 0.603, 0.662 against pi_1 on seed 0 and 0.550, 0.557 on seed
    1, i.e. 4.6 and 1.6 SE above 1/2 at best):
      - the best iterate (Alg. 2, line 9) beats pi_1 by more than one SE;
      - policy samples beat the gold in every iteration (sample>gold pairs exist);
      - the rubric judge is transitive: no preference cycle and no Bradley-Terry/Copeland disagreement, while
        the intransitive preset (--judge demo_rps, one iteration from the same pi_1) shows cycles.
    SE = sqrt(1/4 / n) bounds the standard error of a mean of n outcomes in [0, 1]. Not asserted: that every
    iteration improves on the previous one, or that the last one is the best (with 2 threads, the third iterate of
    seed 1 fell back to 0.43: that is why Alg. 2 outputs the best iterate)."""
    import train
    out = str(tmp_path / "run")
    train.main(["--out", out, "--iterations", "2", "--prompts_per_iter", "266"])
    assert json.load(open(os.path.join(out, "config.json")))["threads"] == "auto"    # the flags, saved
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["iter"] for r in rows] == [0, 1, 2, "mix"]
    rows = rows[:-1]
    se = (0.25 / 200) ** 0.5
    vs_init = [r["winrate_vs_init"] for r in rows]
    print("vs_init", vs_init, "vs_gold", [r["winrate_vs_gold"] for r in rows], "SE", se)
    assert max(vs_init[1:]) > 0.5 + se
    assert all(r["mean_length"] > 4 for r in rows)
    assert all(r["provenance"]["sample>gold"] > 0 for r in rows[1:])
    assert all(r["preferences"]["cycle_share"] == 0 and r["preferences"]["bt_disagreement_share"] == 0
               and r["preferences"]["n"] > 100 for r in rows[1:])
    # the intransitive preset on the same SFT'd pi_1: its preference tables do contain cycles
    cyc = str(tmp_path / "cyclic")
    train.main(["--out", cyc, "--model", os.path.join(out, "demo", "init"), "--prompts", os.path.join(out, "demo",
                "prompts.jsonl"), "--judge", "demo_rps", "--iterations", "1", "--prompts_per_iter", "100",
                "--num_val", "20", "--eval_temperature", "0.7"])
    pref = [json.loads(line) for line in open(os.path.join(cyc, "metrics.jsonl"))][1]["preferences"]
    print("demo_rps preferences", pref)
    assert pref["n"] >= 90 and pref["cycle_share"] > 0.05

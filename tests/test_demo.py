"""demo_task.py: the rubric's degrees and ties, the cyclic judge, the teacher's designed error rate, prepare's cache,
the BT baseline, and a reduced end-to-end `train.py` run on the demo (the issue's claims at small size)."""
import json
import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import demo_task as d  # noqa: E402

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
    return d.Config(**{"n_prompts": 24, "n_demos": 64, "sft_steps": 3, "sft_batch": 8, "dim": 32, "ffn": 64,
                       **kw})


def test_prepare_is_cached_and_loadable(tmp_path):
    torch.set_num_threads(1)
    out = str(tmp_path / "demo")
    logs = []
    m, p = d.prepare(out, 0, small_cfg(), log=logs.append)
    stamp = os.path.getmtime(os.path.join(m, "model.safetensors"))
    assert any("SFT" in x for x in logs)
    logs.clear()
    assert d.prepare(out, 0, small_cfg(), log=logs.append) == (m, p)
    assert os.path.getmtime(os.path.join(m, "model.safetensors")) == stamp and "reusing" in logs[0]
    rows = [json.loads(line) for line in open(p)]
    assert len(rows) == 24 and len({r["prompt"] for r in rows}) == 24
    assert all(set(r) == {"id", "prompt", "gold"} and d.rubric(r["prompt"], r["gold"]) >= 4 for r in rows)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(m)
    assert tok.decode(tok.encode(rows[0]["prompt"])) == rows[0]["prompt"]
    hf = AutoModelForCausalLM.from_pretrained(m)
    from model import Transformer
    ours = Transformer.from_pretrained(m)
    idx = torch.tensor([tok.encode(rows[0]["prompt"])])
    assert torch.allclose(hf(idx).logits, ours(idx), atol=1e-4)
    d.prepare(out, 0, small_cfg(sft_steps=4), log=logs.append)     # other settings: rebuilt
    assert os.path.getmtime(os.path.join(m, "model.safetensors")) != stamp or "reusing" not in logs[-1]


def test_fit_bt_prefers_correct_answers_and_cannot_express_the_cycle():
    rng, ann = random.Random(0), []
    for _ in range(200):
        p = d.make_prompt(rng)
        cands = [d.teacher(p, rng) for _ in range(4)]
        ann.append((p, cands, d.demo_cyclic(p, cands)["P"]))
    w = d.fit_bt(ann)
    assert w[0] > 1.0                                          # the rubric score carries most of the preference
    r = {s: w[1 + i] for i, s in enumerate(d.STYLES)}
    # a scalar reward ranks the three styles; the cyclic judge says each of them loses to another one
    top = max(r, key=r.get)
    beaten_by = d.STYLES[(d.STYLES.index(top) - 1) % 3]
    assert d.pref(P, "0 1 3 4".replace(" ", beaten_by), "0 1 3 4".replace(" ", top)) > 0.5


@pytest.fixture(scope="module")
def sft_demo(tmp_path_factory):
    """One SFT'd demo model (tokenizer + pi_1 + prompts), shared by the module's end-to-end tests."""
    torch.set_num_threads(2)
    cfg = d.Config(sft_steps=400, n_prompts=400)
    return d.prepare(str(tmp_path_factory.mktemp("sft") / "demo"), 0, cfg, log=lambda *a: None)


def test_reduced_demo_run_shows_the_claims(tmp_path, sft_demo):
    """train.py on the demo at reduced size (400 SFT steps, T = 2, 120 prompts per iteration, 120 validation
    prompts, greedy evaluation as in the defaults). Asserted: every DNO iterate beats pi_1, the second one more
    than the first, and the last one beats the gold teacher (> 50%); length and pair provenance are reported and
    samples beat the gold in every iteration. One standard error of a win-rate is ~0.03 here; the measured gaps
    are ~3 of them. The full-size default run (T = 3) shows the rise at every iteration."""
    import train
    torch.set_num_threads(2)
    m, p = sft_demo
    out = str(tmp_path / "run")
    train.main(["--out", out, "--model", m, "--prompts", p, "--iterations", "2", "--prompts_per_iter", "120",
                "--num_val", "120", "--max_new_tokens", "20", "--eval_temperature", "0", "--lr", "8e-5",
                "--lr_decay", "1.0", "--batch_size", "32", "--micro_batch", "32"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["iter"] for r in rows] == [0, 1, 2]
    vs_init = [r["winrate_vs_init"] for r in rows]
    vs_gold = [r["winrate_vs_gold"] for r in rows]
    print("vs_init", vs_init, "vs_gold", vs_gold, "len", [r["mean_length"] for r in rows])
    assert min(vs_init[1:]) > 0.53 and vs_init[2] > vs_init[1]      # measured 0.542 -> 0.625, 0.558 -> 0.654
    assert vs_gold[-1] > 0.5 and vs_gold[-1] > vs_gold[0] + 0.02
    assert all(r["mean_length"] > 4 for r in rows)
    assert all(r["provenance"]["sample>gold"] > 0 for r in rows[1:])


def test_compare_bt_on_a_hand_made_run(tmp_path):
    """compare_bt's plumbing on a fake run folder (annotations written by hand, best = pi_1): the table is
    antisymmetric and every policy gets a worst case."""
    torch.set_num_threads(1)
    out = tmp_path / "run"
    m, p = d.prepare(str(out / "demo"), 0, small_cfg(), log=lambda *a: None)
    rows = [json.loads(line) for line in open(p)][:6]
    samples, judged = [], []
    for r in rows:
        cands = [r["gold"].replace(d.style_of(r["gold"]), s) for s in d.STYLES] + [r["gold"]]
        samples.append({"id": r["id"], "samples": [{"text": c} for c in cands[:3]]})
        judged.append({"id": r["id"], "ok": True, **d.demo_cyclic(r["prompt"], cands)})
    for name, data in (("samples", samples), ("judgments", judged)):
        os.makedirs(out / "iter_1" / name)
        with open(out / "iter_1" / name / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in data)
        open(out / "iter_1" / name / "done", "w").close()
    (out / "best.json").write_text(json.dumps({"iter": 0, "model": m}))
    rep = d.compare_bt(str(out), n=2, n_prompts=8, log=lambda *a: None)
    names = list(rep["table"])
    assert len(names) == 7 and len(rep["w"]) == 4
    for a in names:
        assert 0 <= rep["policies"][a]["worst"] <= 1
        for b in names:
            if a != b:
                assert abs(rep["table"][a][b] + rep["table"][b][a] - 1) < 1e-9
    # the teacher in one fixed style is beaten by the teacher in the style that beats it
    t = {s: rep["table"][f"teacher {s!r}"] for s in d.STYLES}
    assert t[" "]["teacher ','"] > 0.5 and t[","]["teacher '|'"] > 0.5 and t["|"]["teacher ' '"] > 0.5

"""compare_bt.py --bt refit: the Bradley-Terry loop whose reward is refitted every iteration on that
iteration's annotations of its own policy's candidates (demo_bt_refit), no others; and the refusals
of the new flags."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from experiments import compare_bt as cb  # noqa: E402
from demo import task as d  # noqa: E402

PROMPTS = [("a", "sort: 4 1 3 0\n", "0 1 3 4"), ("b", "sort: 2 7 9\n", "2 7 9"),
           ("c", "sort: 5 5 1\n", "1 5 5")]


def fake_refit_run(root, per_iter):
    """A train.py run folder as the refit judge reads it: the config (prompts, gold) in
    iter_1/samples/manifest.json and each iteration's samples.jsonl (per_iter[t-1]: style of the
    K = 2 samples of every prompt)."""
    (root / "prompts.jsonl").write_text("".join(
        json.dumps({"id": i, "prompt": p, "gold": g}) + "\n" for i, p, g in PROMPTS))
    for t, styles in enumerate(per_iter, 1):
        os.makedirs(root / f"iter_{t}" / "samples")
        rows = [{"id": i, "samples": [{"text": s.join(sorted(g.split(" ") if " " in g else g))}
                                      for s in styles]} for i, _, g in PROMPTS]
        (root / f"iter_{t}" / "samples" / "samples.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
    (root / "iter_1" / "samples" / "manifest.json").write_text(json.dumps(
        {"config": {"model": "PI1", "prompts": str(root / "prompts.jsonl"), "gold": True}}))


def annotations(root, t):
    """What DNO's judge (demo_rps) says of iteration t's candidates: K samples + the gold."""
    rows = {r["id"]: r for r in cb.jsonl(root / "prompts.jsonl")}
    got = []
    for s in cb.jsonl(root / f"iter_{t}" / "samples" / "samples.jsonl"):
        c = [x["text"] for x in s["samples"]] + [rows[s["id"]]["gold"]]
        got.append((rows[s["id"]]["prompt"], c, d.demo_rps(rows[s["id"]]["prompt"], c)["P"]))
    return got


def test_refit_judge_refits_on_each_iterations_own_annotations(tmp_path, monkeypatch):
    """Iteration 1's policy answers ' ' and ',', iteration 2's '|' and ',': the reward of iteration
    t is fit_bt on iteration t's annotations only (exactly), so it changes between iterations, is
    kept on disk and reused, and the judge's table is sigmoid(r_i - r_j) under it. Validation
    before any annotation (eval0) ties everything."""
    fake_refit_run(tmp_path, [(" ", ","), ("|", ",")])
    monkeypatch.setenv("DEMO_BT_REFIT", str(tmp_path))
    monkeypatch.setenv("DEMO_BT_JUDGE", "demo_rps")
    monkeypatch.setattr(cb, "REFIT", {})
    prompt, cands = PROMPTS[0][1], ["0 1 3 4", "0,1,3,4", "0|1|3|4"]
    tables = {t: cb.demo_bt_refit(prompt, cands, id=f"train{t}:a")["P"] for t in (1, 2)}
    w = {t: json.loads((tmp_path / "bt_rewards" / f"reward_{t}.json").read_text())["w"]
         for t in (1, 2)}
    for t in (1, 2):
        assert w[t] == pytest.approx(cb.fit_bt(annotations(tmp_path, t)), abs=1e-9)
        r = [sum(a * b for a, b in zip(w[t], cb.features(prompt, c))) for c in cands]
        assert tables[t][0][1] == pytest.approx(1 / (1 + 2.718281828459045 ** (r[1] - r[0])))
    assert max(abs(a - b) for a, b in zip(w[1], w[2])) > 0.5    # refitted: another reward
    assert w[1] != pytest.approx(cb.fit_bt(annotations(tmp_path, 1) + annotations(tmp_path, 2)))
    assert cb.demo_bt_refit(prompt, cands, id="eval2:a:gold:0")["P"] == tables[2]   # line 9: reward t
    assert cb.demo_bt_refit(prompt, cands, id="eval0:a:gold:0")["P"] == [[0.5] * 3] * 3
    (tmp_path / "bt_rewards" / "reward_1.json").write_text(json.dumps({"w": [0, 0, 0, 9.0]}))
    monkeypatch.setattr(cb, "REFIT", {})                           # a new process: read back
    assert cb.demo_bt_refit(prompt, cands, id="train1:a")["P"][2][0] > 0.99
    monkeypatch.delenv("DEMO_BT_REFIT")
    with pytest.raises(ValueError, match="DEMO_BT_REFIT"):
        cb.demo_bt_refit(prompt, cands, id="train1:a")


def test_compare_refuses_a_bad_bt_loop_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="--bt"):
        cb.compare(cb.Config(out=str(tmp_path / "cmp"), bt="frozen,learned"))
    assert not os.path.exists(tmp_path / "cmp")


@pytest.mark.slow
@pytest.mark.experiment
def test_the_optimistic_magnets_last_iterate_beats_pi_1_and_the_frozen_bt_loops(tmp_path):
    """docs/experiments.md's seed-0 run at T = 32 (about 5 CPU-minutes, single-threaded): the last
    iterate of --optimistic 6 --ref_mix 0.2 --eta 0.2 is above pi_1 and above the frozen BT loop's
    last iterate by 3 paired standard errors, with >= 0.9 of its answers acceptable. Measured at
    600 prompts on seeds 0, 1, 2: +0.180 +- 0.016, +0.249 +- 0.014, +0.174 +- 0.024 above pi_1 and
    +0.25..+0.36 above the frozen loop. Against the BT loop refitted every iteration it is only level
    (+0.002 +- 0.019 on seed 0), so that is not asserted. The same check on the frozen BT loop's
    own last iterate fails (measured: -0.069 +- 0.017 from pi_1)."""
    from demo import sft as ds
    init = str(tmp_path / "init")
    ds.prepare(init, 0, ds.Config(teacher_styles="0.8,0.15,0.05"), log=lambda *a: None)
    flags = ("--iterations 32 --prompts_per_iter 50 --num_samples 3 --num_val 40 --lr 3e-4 "
             "--epochs 2 --target soft --pairs all --replay 0 --eval_temperature 0.7 --top_p 1.0 "
             "--micro_batch 64 --opponents samples --ref_mix 0.5 --lr_decay 0.97")
    also = "--ref_mix 0.2 --optimistic 6 --eta 0.2"
    cfg = cb.Config(out=str(tmp_path / "cmp"), init=init, teacher_styles="0.8,0.15,0.05",
                    train=flags, n_prompts=600, at="32", bt="frozen", also=also)
    rep = cb.compare(cfg)[32][0]
    row = rep[f"DNO {also} last"]
    print({k: (round(v["worst"], 3), v.get("vs pi_1"), v.get("vs BT loop")) for k, v in rep.items()})
    for key in ("vs pi_1", "vs BT loop"):
        diff, se = row[key]
        assert diff > 3 * se and diff > 0, (key, diff, se)
    assert row["acceptable"] >= 0.9
    diff, se = rep["BT loop last"]["vs pi_1"]  # the same check on the frozen BT loop: it fails
    assert not diff > 3 * se

"""dnolib/tracking.py: TensorBoard events read back, W&B offline, a missing package, train.py."""
import builtins
import glob
import os

import pytest

from dnolib import tracking


def test_none_and_a_missing_package_are_the_no_op_tracker_and_one_line(monkeypatch, tmp_path):
    assert isinstance(tracking.open_tracker("none", tmp_path, {}), tracking.NullTracker)
    real = builtins.__import__

    def no_tb(name, *a, **kw):
        if name.startswith(("torch.utils.tensorboard", "wandb")):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_tb)
    for kind in ("tensorboard", "wandb"):
        lines = []
        t = tracking.open_tracker(kind, tmp_path, {"lr": 1e-5}, log=lines.append)
        assert isinstance(t, tracking.NullTracker) and len(lines) == 1
        assert f"pip install {kind}" in lines[0] and "goes on" in lines[0]
        t.log("train", {"loss": 1.0}, 1)                # the loop calls it the same way
        t.close()


def test_tensorboard_events_read_back(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install "
                        "tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = tracking.open_tracker("tensorboard", str(tmp_path), {"lr": 4e-5, "judge": "demo"})
    losses = [0.69, 0.61, 0.55]
    for s, loss in enumerate(losses, 1):
        t.log("train", {"loss": loss, "lr": 4e-5 * s, "note": "text is skipped"}, s)
    t.log("eval", {"vs_gold": 0.42, "pairs": 17, "cycles": None}, 1)
    t.close()
    files = glob.glob(os.path.join(tmp_path, "tensorboard", "events.out.tfevents.*"))
    assert len(files) == 1
    ev = EventAccumulator(files[0])
    ev.Reload()
    assert set(ev.Tags()["scalars"]) == {"train/loss", "train/lr", "eval/vs_gold", "eval/pairs"}
    got = [(e.step, round(e.value, 5)) for e in ev.Scalars("train/loss")]
    assert got == [(s, v) for s, v in enumerate(losses, 1)]
    assert [e.value for e in ev.Scalars("eval/pairs")] == [17.0]
    assert b"judge" in ev.Tensors("config/text_summary")[0].tensor_proto.string_val[0]


def test_wandb_offline_writes_a_local_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")         # no network, no login
    monkeypatch.setenv("WANDB_SILENT", "true")
    t = tracking.open_tracker("wandb", str(tmp_path), {"lr": 4e-5})
    assert isinstance(t, tracking.WandbTracker)
    t.log("train", {"loss": 0.69}, 1)
    t.log("eval", {"vs_gold": 0.5}, 0)
    t.close()
    runs = glob.glob(os.path.join(tmp_path, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(runs) == 1 and os.path.getsize(runs[0]) > 0


def test_train_report_to_tensorboard_logs_the_config_steps_and_metrics_jsonl(tmp_path,
                                                                            monkeypatch):
    """train.py --report_to tensorboard on a tiny task: train/<x> is the checkpoint stage's step
    log, eval/<x> at step t every number of metrics.jsonl's row t (nested ones flattened), and
    the config is there."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install "
                        "tensorboard)")
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import train
    from tiny import make_hf_model

    make_hf_model("llama", tmp_path / "model")
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"say {i}:", "gold": f"gold {i}"}) + "\n")
    (tmp_path / "tjudge.py").write_text("def judge(prompt, candidates):\n    return {'scores': "
                                        "[float(len(set(c)) % 7) for c in candidates]}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    train.main(["--out", str(out), "--model", str(tmp_path / "model"), "--prompts",
                str(tmp_path / "prompts.jsonl"), "--judge", "tjudge:judge", "--iterations", "2",
                "--prompts_per_iter", "3", "--num_val", "4", "--num_samples", "3",
                "--max_new_tokens", "8", "--batch_size", "2", "--micro_batch", "2",
                "--report_to", "tensorboard"])
    files = glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))
    assert len(files) == 1
    ev = EventAccumulator(files[0], size_guidance={"scalars": 0})
    ev.Reload()
    steps = [json.loads(s) for t in (1, 2)
             for s in open(out / f"iter_{t}" / "checkpoint" / "train_log.jsonl")]
    got = [(e.step, e.value) for e in ev.Scalars("train/loss")]
    assert [s for s, _ in got] == list(range(1, len(steps) + 1))     # one axis over the run
    assert [v for _, v in got] == pytest.approx([s["loss"] for s in steps], rel=1e-6)
    rows = [json.loads(s) for s in open(out / "metrics.jsonl")]
    assert [r["iter"] for r in rows] == [0, 1, 2, "mix"]
    for r in rows:
        prefix, step = ("mix", 2) if r["iter"] == "mix" else ("eval", r["iter"])
        want = tracking.numbers(r)
        assert {"winrate_vs_gold", "lc_winrate_vs_gold", "mean_length"} <= set(want)
        if r["iter"] in (1, 2):                         # the training facts, nested ones too
            assert "num_pairs" in want and any(n.startswith("preferences/") for n in want)
        for name, value in want.items():
            at = {e.step: e.value for e in ev.Scalars(f"{prefix}/{name}")}
            assert at[step] == pytest.approx(value, rel=1e-6), (prefix, step, name)
    assert "config/text_summary" in ev.Tags()["tensors"]

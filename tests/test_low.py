"""The low items of issue 28, one test per cause: sample.py's --max_new_tokens against the model's
context, evaluate.py on a stage file of the wrong JSON type and on a missing iteration, the
UltraFeedback preparer on a list-valued instruction and on duplicate ids, tabular.py --eta nan.
CPU, offline, seconds.

    python -m pytest -q tests/test_low.py
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

import evaluate
import sample
from data.ultrafeedback.prepare import Config as PrepConfig, DataError, convert
from dnolib.stages import StageError
from test_train import FLAGS, baseline, task  # noqa: F401 (fixtures)
from tiny import make_hf_model, make_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_max_new_tokens_past_the_context_is_one_line_before_any_allocation(tmp_path):
    make_hf_model("llama", tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "The cat"}\n')
    argv = [sys.executable, os.path.join(ROOT, "sample.py"), "--model", str(tmp_path / "m"),
            "--prompts", str(src), "--out", str(tmp_path / "o.jsonl")]
    r = subprocess.run(argv + ["--max_new_tokens", "1000000000"], capture_output=True, text=True,
                       timeout=120)  # was: a traceback trying to allocate a 1 TB KV cache
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr[-500:]
    assert "leaves no room for a prompt" in r.stderr
    from dnolib.model import Transformer
    model, tok = Transformer.from_pretrained(tmp_path / "m"), make_tokenizer()
    out = sample.generate(model, tok, ["The cat"], max_new_tokens=10 ** 9, temperature=0,
                          stop_ids=[])[0][0]  # called directly: capped at the context, no 1 TB
    assert len(out["tokens"]) + len(sample.encode_prompt(tok, "The cat")) == model.args.max_seq_len


def test_evaluate_names_a_stage_file_of_the_wrong_type_and_a_missing_iteration(baseline, tmp_path,
                                                                               capsys):
    out = tmp_path / "run"
    shutil.copytree(baseline[0], out)
    evaluate.report(str(out))
    os.remove(out / "iter_0/eval/done")  # iteration 0 lost, iteration 1 kept
    evaluate.report(str(out))
    err = capsys.readouterr().out  # was: dropped from the table and the mixture without a word
    assert "iter_0" in err and "left out of the table" in err
    (out / "iter_1/eval/metrics.json").write_text("[1, 2]")
    with pytest.raises(StageError, match=r"iter_1/eval/metrics.json: .*JSON list, not an object"):
        evaluate.report(str(out))  # was: TypeError deep in the report
    (out / "iter_1/pairs/manifest.json").write_text("3")
    r = subprocess.run([sys.executable, "evaluate.py", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.startswith("error: ")


def test_prepare_refuses_a_list_instruction_and_keeps_ids_unique():
    rows = [{"instruction": ["a", "list"], "completions": [{"model": "m", "response": "x"}]}]
    with pytest.raises(DataError, match="row 1: 'instruction' is a JSON list, not text"):
        convert(rows, PrepConfig())  # was: AttributeError
    same_id = [{"prompt": p, "prompt_id": "one", "chosen": [{"role": "assistant", "content": "g"}]}
               for p in ("first", "second")]
    records, counts = convert(same_id, PrepConfig())  # was: two records with id "one"
    assert [r["id"] for r in records] == ["one"] and counts["duplicate_id"] == 1


@pytest.mark.parametrize("eta", ["nan", "inf"])
def test_tabular_refuses_an_eta_that_is_not_a_finite_positive_number(eta):
    r = subprocess.run([sys.executable, "-m", "experiments.tabular", "--eta", eta, "--iters", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "finite --eta" in r.stderr
    assert "nan" not in r.stdout  # was: ran and printed nan


def test_a_finished_run_is_not_reused_with_another_micro_batch(task, baseline, tmp_path,
                                                               monkeypatch):
    """--micro_batch changes the summation order of the accumulated gradient, so the checkpoint's
    bytes (was: in train.NO_ARTIFACT, a finished run reused with another value)."""
    from test_train import run_inline
    out = tmp_path / "run"
    shutil.copytree(baseline[0], out)
    msg = run_inline(task, out, monkeypatch, "--micro_batch", "3")
    assert "was made with --micro_batch" in msg, msg


def test_the_rows_in_flight_are_chosen_once_per_stage_and_kept_for_its_rerun(task, baseline,
                                                                             tmp_path, monkeypatch):
    """--sample_rows 0 sizes the rows in flight from the memory free now; a draw depends on them
    (rounding), so the choice is kept (OUT/iter_t/<stage>.rows.<rank>.json) and an unfinished
    stage's rerun uses it, not what is free then (was: sized again, so other samples)."""
    import iteration
    import train
    out = tmp_path / "run"
    shutil.copytree(baseline[0], out)
    pin = out / "iter_1/samples.rows.0.json"
    kept = json.loads(pin.read_text())["value"]
    samples = (out / "iter_1/samples/samples.jsonl").read_text()
    for name in ("samples", "judgments", "pairs", "reference", "checkpoint", "eval"):
        shutil.rmtree(out / "iter_1" / name)        # iteration 1 unfinished: redone
    used, real = [], iteration.generate
    monkeypatch.setattr(iteration.sample, "default_rows", lambda *a, **k: kept + 3)  # memory moved
    monkeypatch.setattr(iteration, "generate", lambda *a, **k: used.append(k["rows"]) or real(*a, **k))
    monkeypatch.syspath_prepend(str(task))
    train.main(["--out", str(out), "--model", str(task / "model"), "--prompts",
                str(task / "prompts.jsonl"), *FLAGS])
    assert used and set(used) == {kept}
    assert (out / "iter_1/samples/samples.jsonl").read_text() == samples

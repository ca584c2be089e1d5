"""A run you can trust: one test per cause of the defects found by trying train.py as a new user would (the judge
budget, outages, verified resumes, one run per folder, flags checked up front, one-line errors, the scored end
token). Tiny random Llama + a deterministic judge module, CPU, offline (fixtures shared with test_train.py).

    python -m pytest -q tests/test_trust.py
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from test_train import FLAGS, ROOT, baseline, cmd, env_for, free_port, run_inline, run_ok, task  # noqa: F401
from dnolib.stages import read_jsonl  # noqa: E402
import iteration  # noqa: E402
from dnolib import stages  # noqa: E402
import train  # noqa: E402

HALF_JUDGE = '''
def half(prompt, candidates):   # fails (no score) on every prompt that starts with "say dog"
    return {"scores": [None if "say dog" in prompt else float(len(c) % 7) for c in candidates]}
'''


def calls(log):
    return len(open(log).readlines()) if os.path.exists(log) else 0


# 1. the budget holds for the whole run, across judge calls and resumes
def test_budget_is_for_the_whole_run_and_survives_a_resume(task, tmp_path, monkeypatch):
    out, log = tmp_path / "out", tmp_path / "calls.jsonl"
    monkeypatch.setenv("JUDGE_LOG", str(log))
    msg = run_inline(task, out, monkeypatch, "--max_calls", "12")   # pi_1's eval takes 8 calls, the judgments 6+
    assert "budget" in msg and calls(log) == 12                     # per call, 12 + 12 would have been allowed
    assert not (out / "iter_1" / "judgments" / "done").exists()
    msg = run_inline(task, out, monkeypatch, "--max_calls", "12")   # a resume spends from the same ledger
    assert "budget" in msg and calls(log) == 12
    assert json.load(open(out / "judge_ledger.json"))["calls"] == 12


# 2. an outage stops within seconds and commits nothing; too many failed judgments are never committed
def test_judge_outage_stops_fast_and_commits_nothing(task, tmp_path, monkeypatch):
    monkeypatch.setenv("DNO_TEST_KEY", "x")
    t0 = time.time()
    msg = run_inline(task, tmp_path / "out", monkeypatch, "--judge", "pairwise", "--judge_model", "m",
                     "--api_key_env", "DNO_TEST_KEY", "--base_url", f"http://127.0.0.1:{free_port()}/v1")   # nothing listens there
    assert time.time() - t0 < 60, "the breaker did not stop the run"
    assert "127.0.0.1" in msg and not (tmp_path / "out" / "iter_0" / "eval" / "done").exists()


def test_unknown_judge_price_under_a_budget_is_refused_before_sampling(task, tmp_path, monkeypatch):
    monkeypatch.setenv("DNO_TEST_KEY", "x")
    out = tmp_path / "out"
    msg = run_inline(task, out, monkeypatch, "--judge", "rubric", "--judge_model", "gpt-5-mini",
                     "--max_usd", "1", "--api_key_env", "DNO_TEST_KEY")
    assert msg.startswith("error: no price known for model 'gpt-5-mini'") and "--prices" in msg
    assert not (out / "iter_0").exists()  # nothing sampled
    msg = run_inline(task, out, monkeypatch, "--judge", "rubric", "--api_key_env", "DNO_TEST_KEY")
    assert msg.startswith("error: --judge rubric needs --judge_model")


def test_failed_judgments_above_the_threshold_are_not_committed(task, tmp_path, monkeypatch):
    (task / "halfjudge.py").write_text(HALF_JUDGE)
    out = tmp_path / "out"
    msg = run_inline(task, out, monkeypatch, "--judge", "halfjudge:half")
    assert "judgments failed" in msg and "--max_failure_rate" in msg
    assert not (out / "iter_0" / "eval" / "done").exists()
    monkeypatch.syspath_prepend(str(task))
    train.main(["--out", str(out), "--model", str(task / "model"), "--prompts", str(task / "prompts.jsonl"), *FLAGS,
                "--judge", "halfjudge:half", "--max_failure_rate", "1.0"])     # the user accepts the failures
    prompts = {r["id"]: r["prompt"] for r in read_jsonl(task / "prompts.jsonl")}
    judged = read_jsonl(out / "iter_1" / "judgments" / "judgments.jsonl")
    assert [j["ok"] for j in judged] == ["say dog" not in prompts[j["id"]] for j in judged] and not all(
        j["ok"] for j in judged)


# 3. resume checks each stage's inputs and flags, and joins records by id
def test_resume_refuses_changed_flags_and_edited_files(task, baseline, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(baseline[0], out)
    msg = run_inline(task, out, monkeypatch, "--num_val", "5")
    assert msg.startswith("error: iter_0/eval was made with --num_val 4, not 5")
    msg = run_inline(task, out, monkeypatch, "--num_samples", "2")
    assert msg.startswith("error: iter_1/samples was made with --num_samples 3, not 2")
    f = out / "iter_1" / "samples" / "samples.jsonl"
    f.write_text("".join(open(f).readlines()[1:]))                  # one line deleted
    msg = run_inline(task, out, monkeypatch)
    assert msg.startswith("error: iter_1/samples: its files changed")


def test_pairs_join_samples_and_judgments_by_id(task, baseline, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(baseline[0], out)
    d = out / "iter_1" / "judgments"
    lines = open(d / "judgments.jsonl").readlines()
    (d / "judgments.jsonl").write_text("".join(lines[::-1]))         # the same records in another order
    m = json.load(open(d / "manifest.json"))
    json.dump({**m, "outputs": stages.sha(str(d))}, open(d / "manifest.json", "w"))
    for s in ("pairs", "reference", "checkpoint", "eval"):
        shutil.rmtree(out / "iter_1" / s)
    run_ok(task, out)
    assert open(out / "iter_1/pairs/pairs.jsonl").read() == open(baseline[0] / "iter_1/pairs/pairs.jsonl").read()


# 4. one run per folder
@pytest.mark.slow
def test_second_run_on_one_folder_is_refused_and_a_killed_runs_lock_is_free(task, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(cmd(task, out, "--stage_pause", "60"), env=env_for(task), stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    for line in first.stdout:
        if line.startswith("iter 0 | eval: start"):
            break
    second = subprocess.run(cmd(task, out), env=env_for(task), capture_output=True, text=True, timeout=120)
    assert second.returncode != 0 and second.stderr.strip().count("\n") == 0
    assert f"in use by another run (pid {first.pid})" in second.stderr
    first.kill()                                                    # kill -9: its lock stays behind
    first.wait()
    third = subprocess.run(cmd(task, out), env=env_for(task), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and not (out / "lock").exists()    # the kernel dropped the dead run's lock


# 5. every flag is checked before any model is loaded or built
@pytest.mark.parametrize("flag,value,expect", [
    ("batch_size", "0", "--batch_size must be >= 1"), ("micro_batch", "0", "--micro_batch must be >= 1"),
    ("replay", "abc", "invalid float value"), ("replay", "0.9", "--replay must be in [0, 0.5)"),
    ("eta", "0", "--eta must be"), ("iterations", "-1", "--iterations must be >= 1"),
    ("num_val", "0", "--num_val must be >= 1"), ("schedule", "bogus", "--schedule must be one of"),
    ("device", "foo", "--device must be one of"), ("temperature", "-1", "--temperature must be"),
    ("num_samples", "0", "--num_samples must be >= 1"), ("lr", "nan", "--lr must be finite"),
    ("target", "medium", "--target must be one of hard, soft"), ("pairs", "some", "--pairs must be one of"),
    ("threads", "0", "--threads must be auto or an integer >= 1"),
])
def test_bad_flags_are_refused_up_front(task, tmp_path, monkeypatch, flag, value, expect):
    t0 = time.time()
    with pytest.raises(SystemExit) as e:                            # no --model: the demo would build and SFT one
        train.main(["--out", str(tmp_path / "out"), f"--{flag}", value])
    msg = str(e.value.code)
    assert expect in msg and msg.startswith("error: ") and "\n" not in msg
    assert time.time() - t0 < 10 and not (tmp_path / "out" / "demo").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present")
def test_device_cuda_without_a_gpu_is_one_line(task, tmp_path, monkeypatch):
    assert "no CUDA device" in run_inline(task, tmp_path / "out", monkeypatch, "--device", "cuda")


# 6. one-line errors that name the file, for broken inputs anywhere
def test_broken_inputs_are_one_line_errors_naming_the_file(task, baseline, tmp_path, monkeypatch):
    assert "nosuchmod" in run_inline(task, tmp_path / "o1", monkeypatch, "--judge", "nosuchmod:judge")
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "caf\xe9"}\n')
    assert f"{bad}: not UTF-8" in run_inline(task, tmp_path / "o2", monkeypatch, prompts=bad)
    model = tmp_path / "model"
    shutil.copytree(task / "model", model)
    cfg = json.load(open(model / "config.json"))
    del cfg["hidden_size"]
    json.dump(cfg, open(model / "config.json", "w"))
    monkeypatch.syspath_prepend(str(task))
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(tmp_path / "o3"), "--model", str(model), "--prompts", str(task / "prompts.jsonl"),
                    *FLAGS])
    assert "config.json" in str(e.value.code) and "hidden_size" in str(e.value.code)
    out = tmp_path / "run"
    shutil.copytree(baseline[0], out)
    (out / "iter_1/checkpoint/model.safetensors").write_bytes(b"garbage")   # a garbage checkpoint in a stage
    assert "iter_1/checkpoint: its files changed" in run_inline(task, out, monkeypatch)
    shutil.copytree(baseline[0], out, dirs_exist_ok=True)
    (out / "iter_1/pairs/manifest.json").write_text("{not json")            # a corrupt stage manifest
    assert "iter_1/pairs/manifest.json: corrupt JSON" in run_inline(task, out, monkeypatch)


# 10. the end token that is scored is the one that ended the sample
def test_response_tokens_score_the_recorded_stop_token():
    from tiny import make_tokenizer
    tok = make_tokenizer()
    row = {"prompt": [{"role": "user", "content": "hi"}], "prompt_tokens": [3, 5, 6]}
    sample = {"tokens": [10, 11], "text": "ab", "finish_reason": "stop", "stop_token": 2}   # ended by </s>
    assert iteration.response_tokens(tok, row, sample, 256) == [10, 11, 2]   # not <|im_end|> (4), the chat default
    assert iteration.response_tokens(tok, row, {**sample, "finish_reason": "length", "stop_token": None}, 256) == [10, 11]
    assert iteration.response_tokens(tok, row, "ab", 256)[-1] == 4           # the gold of a chat prompt: <|im_end|>


def test_every_script_prints_its_help():
    """--help of every script: its flags and their comments (a '%' in a comment once crashed argparse)."""
    for script in ("train.py", "sample.py", "oracle.py", "dno.py", "evaluate.py", "-m experiments.tabular",
                   "-m experiments.compare_bt", "-m demo.task", "-m demo.sft", "-m data.ultrafeedback.prepare"):
        p = subprocess.run([sys.executable, *script.split(), "--help"], capture_output=True, text=True,
                           timeout=120, cwd=ROOT)
        assert p.returncode == 0 and "--" in p.stdout and "Traceback" not in p.stderr, (script, p.stderr[-500:])


# memory: an impossible configuration is refused from an estimate, in seconds, before any work
def test_memory_check_refuses_an_impossible_config(task, tmp_path, monkeypatch):
    t0 = time.time()
    msg = run_inline(task, tmp_path / "out", monkeypatch, "--micro_batch", "100000000")
    assert "lower --micro_batch" in msg and "GiB" in msg and time.time() - t0 < 30
    assert not (tmp_path / "out" / "iter_0").exists()

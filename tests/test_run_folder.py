"""The run folder, tried as an attacker and as a researcher changing a run would: every flag that
shapes an artifact is recorded, a run grows, every printed hint works as printed, one lock holder,
hashes see every byte, one-line errors for a full disk and an out-of-vocabulary tokenizer.
Tiny random Llama + a deterministic judge module, CPU, offline (fixtures from test_train.py).

    python -m pytest -q tests/test_run_folder.py
"""
import dataclasses
import json
import multiprocessing
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from test_train import FLAGS, ROOT, artifacts, baseline, cmd, env_for, run_inline, run_ok, task  # noqa: F401
import iteration  # noqa: E402
from dnolib import stages  # noqa: E402
import train  # noqa: E402


# finding 1: a Config field that shapes no stage and is not declared inert fails here
def test_every_config_field_shapes_a_stage_or_is_declared_inert():
    fields = [f.name for f in dataclasses.fields(train.Config)]
    flags = {f for reads in iteration.STAGES.values() for f in reads.flags}
    inputs = {i for reads in iteration.STAGES.values() for i in reads.inputs}
    for name in fields:
        places = [name in flags, name in train.INPUT_FIELDS, name in train.NO_ARTIFACT]
        assert sum(places) == 1, f"--{name}: declare it in one stage's flags or in NO_ARTIFACT"
    assert flags | set(train.INPUT_FIELDS) | set(train.NO_ARTIFACT) <= set(fields)
    assert set(train.INPUT_FIELDS.values()) <= inputs
    for flag in ("precision", "judge_context", "judge", "judge_model", "base_url", "position_audit"):
        assert flag in flags


def follow(msg, out):
    """Do what a one-line error says, as printed -> the extra flags of the rerun."""
    if m := re.search(r"rerun with (--\w+ \S+), or", msg):
        return m.group(1).split()
    if m := re.search(r"with --rollback (\d+)", msg):
        return ["--rollback", m.group(1)]
    if m := re.search(r"delete (\S+) to redo", msg):
        assert os.path.abspath(m.group(1)).startswith(os.path.abspath(out))
        shutil.rmtree(m.group(1))
        return []
    if "rerun the same command" in msg:
        return []
    raise AssertionError(f"no hint to follow in {msg!r}")


def edit_manifest(path, fn):
    m = json.load(open(path))
    fn(m)
    json.dump(m, open(path, "w"))


# findings 1 and 3: a changed flag is named, and every hint, followed as printed, gets the user out
@pytest.mark.parametrize("case", ["precision", "judge_context", "judge_at_iter_0", "old_manifest",
                                  "files_changed", "corrupt_manifest"])
def test_each_hint_followed_as_printed_gets_the_user_out(task, baseline, tmp_path, monkeypatch, case):
    out = tmp_path / "run"
    shutil.copytree(baseline[0], out)
    (task / "tjudge2.py").write_text("from tjudge import judge\n")   # the same answers, another name
    extra = {"precision": ["--precision", "bf16"], "judge_context": ["--judge_context", "300"],
             "judge_at_iter_0": ["--judge", "tjudge2:judge"]}.get(case, [])
    if case == "old_manifest":                                      # an older train.py recorded less
        edit_manifest(out / "iter_1/reference/manifest.json",
                      lambda m: m["shape"]["flags"].pop("precision"))
    if case == "files_changed":
        f = out / "iter_1/pairs/pairs.jsonl"
        f.write_text(f.read_text().replace('"iter": 1', '"iter":  1', 1))
    if case == "corrupt_manifest":
        (out / "iter_1/judgments/manifest.json").write_text("{not json")
    msg = run_inline(task, out, monkeypatch, *extra)
    expect = {"precision": "iter_1/reference was made with --precision fp32, not bf16",
              "judge_context": "iter_0/eval was made with --judge_context 128000, not 300",
              "judge_at_iter_0": "iter_0/eval was made with --judge tjudge:judge, not tjudge2:judge",
              "old_manifest": "iter_1/reference records no --precision",
              "files_changed": "iter_1/pairs: its files changed",
              "corrupt_manifest": "iter_1/judgments/manifest.json: corrupt JSON"}[case]
    assert expect in msg, msg
    hint = follow(msg, out)
    if case == "judge_at_iter_0":
        hint = follow(msg.split(", or")[1], out)                    # redo with the new judge
        assert hint == ["--rollback", "0"]
    train.main(["--out", str(out), "--model", str(task / "model"), "--prompts",
                str(task / "prompts.jsonl"), *FLAGS, *extra, *hint])  # no SystemExit: it finished
    assert (out / "iter_1/eval/done").exists() and (out / "best.json").exists()
    if case == "judge_at_iter_0":
        flags = json.load(open(out / "iter_0/eval/manifest.json"))["shape"]["flags"]
        assert flags["judge"] == "tjudge2:judge"


def test_a_flag_added_later_reads_as_its_old_behaviour_in_old_manifests(task, baseline, tmp_path,
                                                                        monkeypatch):
    """iteration.ADDED: a run finished before --judge_params existed resumes, reusing every stage
    (was: 'records no --judge_params', a rollback of the whole run); another value is a change."""
    out = tmp_path / "run"
    shutil.copytree(baseline[0], out)
    for m in out.glob("iter_*/*/manifest.json"):
        edit_manifest(m, lambda m: m["shape"]["flags"].pop("judge_params", None))
    before = {p: p.stat().st_mtime_ns for p in out.glob("iter_*/*/done")}
    train.main(["--out", str(out), "--model", str(task / "model"), "--prompts",
                str(task / "prompts.jsonl"), *FLAGS])
    assert before and {p: p.stat().st_mtime_ns for p in out.glob("iter_*/*/done")} == before
    msg = run_inline(task, out, monkeypatch, "--judge_params", '{"seed": 1}')
    assert "was made with --judge_params '', not" in msg, msg


# finding 2: slices do not move when T grows; a finished run grows and keeps iteration 1
def test_slices_do_not_move_when_T_grows():
    rows = [{"id": str(i)} for i in range(23)]
    cfg = train.Config(num_val=5, prompts_per_iter=4, iterations=3)
    val3, s3 = train.split(rows, cfg)
    val9, s9 = train.split(rows, dataclasses.replace(cfg, iterations=9))   # 18 // 4 = 4 per pass
    assert val3 == val9 and s9[:3] == s3 and all(len(s) == 4 for s in s9)
    assert all(len({r["id"] for r in s}) == 4 for s in s9)               # no slice repeats a prompt
    assert {r["id"] for s in s9[:4] for r in s}.isdisjoint(r["id"] for r in val9)


@pytest.mark.slow
def test_a_finished_run_grows_and_reuses_iteration_1_untouched(task, tmp_path):
    out = tmp_path / "run"
    run_ok(task, out, "--prompts_per_iter", "0")                  # 1 iteration: D_1 = all 12 prompts
    first = {k: v for k, v in artifacts(out).items() if k.startswith("iter_")}
    stdout = run_ok(task, out, "--prompts_per_iter", "0", "--iterations", "2")
    assert "iter 1 | samples: start" not in stdout and "iter 2 | samples: start" in stdout
    grown = artifacts(out)
    assert all(grown[k] == v for k, v in first.items())           # iterations 0 and 1 untouched
    assert (out / "iter_2/eval/done").exists()
    assert json.load(open(out / "iter_2/samples/manifest.json"))["counts"]["prompts"] == 12


# finding 4: one lock holder however many start at once; a reused pid cannot block the folder
def _try_lock(out, go, results):
    go.wait()
    try:
        stages.lock(out)
        results.put("won")
        time.sleep(1.0)                                           # hold it while the others try
    except stages.StageError:
        results.put("refused")


def test_many_simultaneous_starts_exactly_one_wins(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for trial in range(10):
        out = tmp_path / f"o{trial}"
        out.mkdir()
        go, results = ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=_try_lock, args=(str(out), go, results)) for _ in range(8)]
        for p in procs:
            p.start()
        got = sorted(results.get(timeout=60) for _ in procs)
        for p in procs:
            p.join()
        assert got.count("won") == 1, (trial, got)


def test_a_lock_naming_a_live_unrelated_pid_does_not_block(tmp_path):
    other = subprocess.Popen(["sleep", "60"])                      # alive, but not a run
    try:
        (tmp_path / "lock").write_text(json.dumps({"pid": other.pid, "host": os.uname().nodename}))
        assert stages.lock(str(tmp_path)) == str(tmp_path / "lock")
        stages.unlock(str(tmp_path))
    finally:
        other.kill()
        other.wait()


# finding 5: a same-size edit of a large file (mtime restored) changes its hash in a new process
def test_hashes_see_every_byte_of_a_large_file(tmp_path):
    f = tmp_path / "big.bin"
    with open(f, "wb") as fh:
        fh.write(b"\0" * (65 << 20))                                # past the old 64 MB shortcut

    def fresh_sha():
        code = f"from dnolib import stages; print(stages.sha({str(f)!r}))"
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, p.stderr
        return p.stdout.strip()
    before, st = fresh_sha(), os.stat(f)
    with open(f, "r+b") as fh:
        fh.seek(40 << 20)
        fh.write(b"\1")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(f) == st.st_size and fresh_sha() != before


# finding 6: one line for a full disk while saving a checkpoint, then a resume
def _small_files():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)                 # a write past the limit: EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


@pytest.mark.slow
def test_a_full_disk_while_saving_a_checkpoint_is_one_line_then_resumes(task, baseline, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(baseline[0], out)
    for s in ("checkpoint", "eval"):
        shutil.rmtree(out / "iter_1" / s)
    p = subprocess.run(cmd(task, out), env=env_for(task), capture_output=True, text=True,
                       timeout=300, preexec_fn=_small_files)      # model.safetensors is 350 KB
    err = p.stderr.strip().splitlines()
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert err[-1].startswith("error: iter_1/checkpoint: cannot save the checkpoint")
    assert not (out / "iter_1/checkpoint").exists()
    assert follow(err[-1], out) == []                              # "rerun the same command"
    run_ok(task, out)
    assert artifacts(out) == artifacts(baseline[0])


# finding 6: token ids past the model's vocabulary are refused in one line (train.py, sample.py)
def test_a_tokenizer_larger_than_the_vocabulary_is_one_line(task, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM
    from tiny import hf_config, make_tokenizer
    model = tmp_path / "small_vocab"
    AutoModelForCausalLM.from_config(hf_config("llama", 40)).save_pretrained(model)
    make_tokenizer().save_pretrained(model)                        # 102 ids
    msg = run_inline(task, tmp_path / "out", monkeypatch, "--model", str(model))
    assert "tokenizer has token ids up to 101" in msg and "vocab_size) has 40" in msg
    p = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--model", str(model),
                        "--prompts", str(task / "prompts.jsonl"), "--out", str(tmp_path / "s.jsonl")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().startswith("error: ") and "token ids up to 101" in p.stderr

"""prepare_data.py: both UltraFeedback layouts from tiny files, gold choice, dedupe/skip counts, --limit, errors."""
import json
import os
import subprocess
import sys

import pytest

from data.ultrafeedback.prepare import Config, DataError, convert, main, read_source
from dnolib.prompts import read_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OPENBMB = [  # openbmb/UltraFeedback layout
    {"source": "evol", "instruction": "Q1", "models": ["a", "gpt-4"], "completions": [
        {"model": "a", "response": "best-rated", "overall_score": 9.0, "fine-grained_score": 5.0},
        {"model": "gpt-4", "response": "from gpt-4", "overall_score": 6.0, "fine-grained_score": 4.0}]},
    {"source": "evol", "instruction": "Q2", "completions": [
        {"model": "a", "response": "low", "overall_score": 3.0, "fine-grained_score": 2.0},
        {"model": "b", "response": "tie-break by fine-grained", "overall_score": 7.0, "fine-grained_score": 4.5},
        {"model": "c", "response": "same overall, lower fine", "overall_score": 7.0, "fine-grained_score": float("nan")}]},
    {"source": "evol", "instruction": "   ", "completions": [{"model": "gpt-4", "response": "x"}]},   # empty prompt
    {"source": "evol", "instruction": " Q1 ", "completions": [{"model": "gpt-4", "response": "dup"}]},  # duplicate
    {"source": "evol", "instruction": "Q3", "completions": [{"model": "a", "response": "  "}]},        # no gold
]
BINARIZED = [  # HuggingFaceH4/ultrafeedback_binarized layout
    {"prompt": "B1", "prompt_id": "id-b1", "score_chosen": 8.0, "score_rejected": 3.0,
     "chosen": [{"role": "user", "content": "B1"}, {"role": "assistant", "content": "chosen answer"}],
     "rejected": [{"role": "user", "content": "B1"}, {"role": "assistant", "content": "rejected answer"}],
     "messages": [{"role": "user", "content": "B1"}, {"role": "assistant", "content": "chosen answer"}]},
    {"prompt": "B2", "prompt_id": "id-b2",  # an sft/gen-split row: messages only
     "messages": [{"role": "user", "content": "B2"}, {"role": "assistant", "content": "sft answer"}]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_cli(args, tmp_path):
    out = tmp_path / "out.jsonl"
    main(args + ["--out", str(out)])
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_openbmb_layout_gold_model_then_best_rated(tmp_path):
    rows = run_cli(["--source", write_jsonl(tmp_path / "uf.jsonl", OPENBMB)], tmp_path)
    assert [r["prompt"] for r in rows] == [[{"role": "user", "content": "Q1"}], [{"role": "user", "content": "Q2"}]]
    assert [r["gold"] for r in rows] == ["from gpt-4", "tie-break by fine-grained"]  # named model wins over rating
    assert rows[0]["id"].startswith("uf-") and len({r["id"] for r in rows}) == 2
    # the output is what train.py reads: dnolib.prompts.read_prompts accepts it and keeps our ids
    assert [r["id"] for r in read_prompts(str(tmp_path / "out.jsonl"))] == [r["id"] for r in rows]


def test_gold_model_empty_uses_rating_and_skip_drops(tmp_path):
    src = write_jsonl(tmp_path / "uf.jsonl", OPENBMB)
    by_rating = run_cli(["--source", src, "--gold_model", ""], tmp_path)
    assert [r["gold"] for r in by_rating] == ["best-rated", "tie-break by fine-grained"]
    skipped = run_cli(["--source", src, "--gold_fallback", "skip"], tmp_path)
    assert [r["gold"] for r in skipped] == ["from gpt-4"]  # Q2 has no gpt-4 completion


def test_counts_of_skipped_rows():
    records, counts = convert(OPENBMB, Config())
    assert counts == {"rows": 5, "kept": 2, "empty_prompt": 1, "no_gold": 1, "duplicate": 1,
                      "duplicate_id": 0}
    assert len(records) == 2


def test_binarized_layout_json_file(tmp_path):
    src = tmp_path / "bin.json"
    src.write_text(json.dumps(BINARIZED))
    rows = run_cli(["--source", str(src)], tmp_path)
    assert [(r["id"], r["gold"]) for r in rows] == [("id-b1", "chosen answer"), ("id-b2", "sft answer")]
    assert rows[0]["prompt"] == [{"role": "user", "content": "B1"}]


def test_folder_with_split_filter(tmp_path):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train_prefs-00000.jsonl", BINARIZED[:1])
    write_jsonl(tmp_path / "data" / "test_prefs-00000.jsonl", BINARIZED[1:])
    assert [r["prompt_id"] for r in read_source(str(tmp_path), "train_prefs")] == ["id-b1"]
    assert len(read_source(str(tmp_path))) == 2  # no split: every file
    with pytest.raises(DataError, match="no .* files for split 'train_sft'"):
        read_source(str(tmp_path), "train_sft")


def test_limit_is_seeded_subset_in_source_order():
    rows = [{"prompt": f"P{i}", "prompt_id": str(i), "chosen": [{"role": "assistant", "content": "a"}]}
            for i in range(20)]
    a, _ = convert(rows, Config(limit=5, seed=1))
    b, _ = convert(rows, Config(limit=5, seed=1))
    c, _ = convert(rows, Config(limit=5, seed=2))
    ids = [int(r["id"]) for r in a]
    assert ids == [int(r["id"]) for r in b] and ids == sorted(ids) and len(ids) == 5
    assert ids != [int(r["id"]) for r in c]


def test_parquet_round_trip_or_one_line_error(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # without pyarrow a .parquet input is a one-line error, not a traceback
        (tmp_path / "x.parquet").write_bytes(b"PAR1")
        with pytest.raises(DataError, match="needs pyarrow"):
            read_source(str(tmp_path / "x.parquet"))
        return
    pq.write_table(pa.Table.from_pylist(BINARIZED[:1]), tmp_path / "x.parquet")
    assert read_source(str(tmp_path / "x.parquet"))[0]["prompt_id"] == "id-b1"


def test_user_mistakes_are_one_line(tmp_path):
    cases = [["--source", str(tmp_path / "missing.jsonl")],
             ["--source", write_jsonl(tmp_path / "odd.jsonl", [{"text": "no known layout"}])],
             ["--source", write_jsonl(tmp_path / "ok.jsonl", BINARIZED), "--gold_fallback", "maybe"]]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"\n')
    cases.append(["--source", str(tmp_path / "bad.jsonl")])
    try:
        import datasets  # noqa: F401
    except ImportError:  # a hub name without the optional package: one line, no network
        cases.append(["--source", "openbmb/UltraFeedback"])
    for args in cases:
        p = subprocess.run([sys.executable, "-m", "data.ultrafeedback.prepare", *args, "--out", str(tmp_path / "o.jsonl")],
                           cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 1 and "Traceback" not in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error: "), (args, p.stderr)


def test_demo_runs_with_no_arguments():
    p = subprocess.run([sys.executable, "-m", "data.ultrafeedback.prepare"], cwd=ROOT, capture_output=True, text=True)
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 0 and lines[-1].startswith("rows 5 | kept 3")
    assert [json.loads(x)["gold"] for x in lines[:-1]] == [
        "11, 13, 17 and 19 are all prime; for example 13.", "Bonjour !", "4"]

"""evaluate.py --alpaca_eval (dnolib/alpaca_eval.py): a demo iterate's answers as AlpacaEval's
model_outputs (valid JSON, the expected fields, the iterate's own greedy answers); bad input in
one line."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import evaluate
from demo import sft as demo_sft
from dnolib.cli import cli
from dnolib.model import Transformer
from dnolib.model_io import load_tokenizer
from sample import generate
from test_vllm_sampler import fake_vllm_env  # noqa: F401 (the stand-in vllm, a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_SET = [{"instruction": "12 34", "output": "ref", "generator": "gpt4_turbo",
             "dataset": "helpful_base"},
            {"instruction": "5 6 7", "output": "ref", "generator": "gpt4_turbo",
             "dataset": "koala"},
            {"instruction": "98", "output": "ref", "generator": "gpt4_turbo", "dataset": "oasst"}]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder as train.py leaves it, as far as the export reads it: config.json, best.json
    naming iterate 1, pi_1 (the demo's SFT policy, two steps) and iter_1/checkpoint (the same
    from another seed, so the two answer differently)."""
    d = tmp_path_factory.mktemp("run")
    pi_1, _ = demo_sft.prepare(str(d / "a"), 0, demo_sft.Config(sft_steps=2, n_prompts=8,
                                                                 n_demos=64, threads="1"),
                               log=lambda *a: None)
    pi_2, _ = demo_sft.prepare(str(d / "b"), 1, demo_sft.Config(sft_steps=2, n_prompts=8,
                                                                 n_demos=64, threads="1"),
                               log=lambda *a: None)
    out = d / "run"
    shutil.copytree(pi_2, out / "iter_1" / "checkpoint")
    (out / "iter_1" / "checkpoint" / "done").write_text("")
    (out / "config.json").write_text(json.dumps({"model": pi_1, "device": "auto", "seed": 0,
                                                 "eval_temperature": 0.0, "top_p": 0.95}))
    (out / "best.json").write_text(json.dumps({"iter": 1, "model": "iter_1/checkpoint"}))
    (d / "alpaca_eval.json").write_text(json.dumps(EVAL_SET))
    return out, pi_1


def export(out, *args):
    """evaluate.py's command line in this process (the export's part of it)."""
    evaluate.alpaca_export(cli(evaluate.Config, ["--out", str(out), *args]))


def greedy(folder, n):
    torch.set_num_threads(1)
    model, tok = Transformer.from_pretrained(folder), load_tokenizer(folder)
    return [o[0]["text"] for o in generate(model, tok, [[{"role": "user", "content": e[
        "instruction"]}] for e in EVAL_SET], max_new_tokens=n, temperature=0)]


def test_export_of_the_best_iterate_is_alpaca_eval_model_outputs(run_folder):
    out, pi_1 = run_folder
    export(out, "--alpaca_eval", str(out.parent / "alpaca_eval.json"), "--answer_tokens", "8")
    got = json.loads((out / "alpaca_eval" / "iter_1.json").read_text())   # valid JSON: a list
    assert isinstance(got, list) and len(got) == 3
    assert all(set(g) == {"instruction", "output", "generator", "dataset"} for g in got)
    assert [g["instruction"] for g in got] == [e["instruction"] for e in EVAL_SET]
    assert [g["dataset"] for g in got] == [e["dataset"] for e in EVAL_SET]
    assert {g["generator"] for g in got} == {"run-iter_1"}
    # the outputs are iterate 1's own greedy answers to each instruction as a user message
    want = greedy(out / "iter_1" / "checkpoint", 8)
    assert [g["output"] for g in got] == want and want != greedy(pi_1, 8)
    export(out, "--alpaca_eval", str(out.parent / "alpaca_eval.json"), "--answer_tokens", "8",
           "--iterate", "0", "--generator", "pi_1")
    got = json.loads((out / "alpaca_eval" / "iter_0.json").read_text())
    assert [g["output"] for g in got] == greedy(pi_1, 8) and got[0]["generator"] == "pi_1"


@pytest.mark.parametrize("eval_set,args,expect", [
    ({"instruction": "not a list"}, (), "want a JSON list"),
    ("{", (), "not JSON"),
    (None, (), "no such file"),
    (EVAL_SET, ("--iterate", "3"), "iteration 3 has no finished checkpoint"),
    (EVAL_SET, ("--answer_tokens", "0"), "--answer_tokens must be >= 1"),
])
def test_bad_input_is_refused_before_the_model_loads(run_folder, tmp_path, monkeypatch,
                                                    eval_set, args, expect):
    out, _ = run_folder
    path = tmp_path / "set.json"
    if eval_set is not None:
        path.write_text(eval_set if isinstance(eval_set, str) else json.dumps(eval_set))
    monkeypatch.setattr(Transformer, "from_pretrained", None)   # loading it would be a TypeError
    with pytest.raises((ValueError, OSError), match=expect):
        export(out, "--alpaca_eval", str(path), *args)


def test_the_command_line_says_it_in_one_line(run_folder, tmp_path):
    out, _ = run_folder
    r = subprocess.run([sys.executable, "evaluate.py", "--out", str(out), "--alpaca_eval",
                        str(tmp_path / "nope.json")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "no such file" in r.stderr and r.stderr.startswith("error: ")


def test_a_vllm_run_exports_through_its_vllm_child(run_folder, tmp_path, fake_vllm_env):
    """A run made with --sampler vllm answers AlpacaEval by the same engine: the answers are the
    stand-in child's draws from each instruction's seed, cut as ours."""
    from dnolib import vllm_sampler as vs
    from sample import default_stop_ids, row_seed

    out, _ = run_folder
    vrun = tmp_path / "vrun"
    shutil.copytree(out, vrun)
    config = json.loads((vrun / "config.json").read_text())
    (vrun / "config.json").write_text(json.dumps({**config, "sampler": "vllm", "vllm_memory": 0.1,
                                                  "vllm_python": sys.executable}))
    export(vrun, "--alpaca_eval", str(out.parent / "alpaca_eval.json"), "--answer_tokens", "8")
    got = json.loads((vrun / "alpaca_eval" / "iter_1.json").read_text())
    folder = vrun / "iter_1" / "checkpoint"
    tok = load_tokenizer(folder)
    stops = default_stop_ids(tok, Transformer.from_pretrained(folder))
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    want = [vs.finish(fake_vllm_env.draw(row_seed(0, i, 0), 8, stops, vocab), set(stops), 8,
                      tok)["text"] for i in range(len(EVAL_SET))]
    assert [g["output"] for g in got] == want
    calls = [json.loads(s) for s in open(tmp_path / "calls.jsonl")]
    assert [(c["requests"], c["temperature"], c["model"]) for c in calls] == [
        (3, [0.0], str(folder))]

"""dnolib/vllm_sampler.py: --sampler vllm's result rule, its shards, the parity check (on our own
processed log-probs, then on vLLM's CPU build where DNO_VLLM_PYTHON names a python with vLLM)."""
import math
import os

import pytest
import torch

from dnolib import vllm_sampler as vs
from dnolib.model import Transformer
from sample import default_stop_ids, generate, row_seed
from tiny import make_hf_model

torch.set_num_threads(1)
VLLM_PYTHON = os.environ.get("DNO_VLLM_PYTHON", "")


def test_finish_cuts_at_the_first_stop_and_at_the_context_like_ours():
    stops = {2, 4}
    assert vs.finish([7, 8, 4, 9], stops, 10, None) == {
        "tokens": [7, 8], "text": "", "finish_reason": "stop", "stop_token": 4}
    # a stop past the context left after the prompt: cut there, as a length stop
    assert vs.finish([7, 8, 9, 2], stops, 3, None)["finish_reason"] == "length"
    assert vs.finish([7, 8, 9, 2], stops, 3, None)["tokens"] == [7, 8, 9]
    assert vs.finish([7, 8, 9], stops, 5, None)["stop_token"] is None


def test_shards_come_back_in_prompt_order(monkeypatch, tmp_path):
    """draw() splits prompts e, e + n, ... over n engines; each child numbers its shard 0..: the
    rows must land on their own prompt and sample."""
    def fake_launch(python, jobs, log):
        import json
        rows = []
        for e, (path, _) in enumerate(jobs):
            job = json.load(open(path))
            for p, (ids, seeds) in enumerate(zip(job["prompts"], job["seeds"])):
                rows += [{"p": p, "k": k, "ids": ids + [s], "e": e} for k, s in enumerate(seeds)]
        return rows
    monkeypatch.setattr(vs, "launch", fake_launch)
    prompts = [[10 + i] for i in range(7)]
    seeds = [[100 * i + k for k in range(3)] for i in range(7)]
    for engines in (1, 2, 3):
        raw = vs.draw("py", tmp_path, prompts, seeds, [2], [5] * 7, temperature=1.0, top_p=1.0,
                      context=64, engines=engines)
        assert [[r["ids"] for r in rs] for rs in raw] == [[[10 + i, 100 * i + k] for k in range(3)]
                                                          for i in range(7)]


def test_processed_logprobs_is_the_renormalised_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    lp = vs.processed_logprobs(logits, 1.0, 0.7)             # nucleus {0, 1}: 0.625, 0.375
    assert torch.allclose(lp[0, :2].exp(), torch.tensor([0.625, 0.375]), atol=1e-6)
    assert math.isinf(lp[0, 2]) and math.isinf(lp[0, 3])
    lp = vs.processed_logprobs(logits, 0.5, 1.0)             # T = 0.5: p^2 renormalised
    p2 = torch.tensor([0.25, 0.09, 0.0225, 0.0025])
    assert torch.allclose(lp[0].exp(), p2 / p2.sum(), atol=1e-6)
    assert torch.allclose(vs.processed_logprobs(logits, 0, 0.7), torch.log_softmax(logits, -1))


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    """A tiny Llama with head size 32 (vLLM's CPU attention needs >= 32)."""
    d = tmp_path_factory.mktemp("llama32")
    make_hf_model("llama", d, num_attention_heads=2, num_key_value_heads=2)
    return d, Transformer.from_pretrained(d).eval()


def fake_vllm(model, prompts, K, T, top_p, seed=0):
    """Rows as vLLM's child writes them, drawn by our sampler, with log-probs formed at T."""
    outs = generate(model, None, prompts, num_samples=K, max_new_tokens=12, temperature=T,
                    top_p=top_p, seed=seed, stop_ids=list(range(2, 30)))
    raw = []
    for ids, o in zip(prompts, outs):
        rows = []
        for s in o:
            toks = s["tokens"] + ([s["stop_token"]] if s["stop_token"] is not None else [])
            with torch.no_grad():
                logits = model(torch.tensor([ids + toks]))[0, len(ids) - 1:-1]
            lp = vs.processed_logprobs(logits, T, top_p).gather(1, torch.tensor(toks)[:, None])
            rows.append({"ids": toks, "lp": lp[:, 0].tolist(), "finish": s["finish_reason"]})
        raw.append(rows)
    return raw, outs


def test_parity_passes_on_the_same_settings_and_fails_on_a_wrong_temperature(tiny32):
    _, model = tiny32
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 90, (n,), generator=g).tolist() for n in (4, 7, 5, 9)]
    raw, ours = fake_vllm(model, prompts, 4, 0.7, 0.95)
    good = vs.parity(model, prompts, raw, ours, 0.7, 0.95)
    assert good["ok"] and good["max_abs"] < 1e-4 and good["tokens"] > 20, good
    for T, top_p in ((1.0, 0.95), (0.5, 0.95), (0.7, 1.0)):   # what vLLM sampled is not this
        bad = vs.parity(model, prompts, raw, ours, T, top_p)
        assert not bad["ok"] and bad["within"] < 0.99, (T, top_p, bad)
    # the stop rates: vLLM never stopping against ours stopping is far more than 4 SE
    never = [[{**r, "finish": "length"} for r in rows] for rows in raw]
    assert good["stop_vllm"] > 0.5 and not vs.parity(model, prompts, never, ours, 0.7, 0.95)["ok"]


def test_probe_says_what_is_missing_in_one_line(tmp_path):
    assert "--vllm_python" in vs.probe("")
    assert "cannot run it" in vs.probe(str(tmp_path / "nope"))
    assert "cannot import vllm" in vs.probe("/bin/false")


@pytest.mark.skipif(not VLLM_PYTHON, reason="DNO_VLLM_PYTHON is not set (a python with vLLM, "
                                            "e.g. its CPU build in a venv of its own)")
def test_vllm_cpu_build_matches_our_model_and_fails_on_a_wrong_temperature(tiny32):
    """vLLM's CPU build on a saved folder: its samples scored by our model agree per token, the
    stop rates agree within 4 SE; scored at the wrong temperature the check fails."""
    folder, model = tiny32
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 90, (n,), generator=g).tolist() for n in (4, 7, 5, 9, 6, 8)]
    ids, K, T, top_p = list(range(len(prompts))), 4, 0.7, 0.95
    seeds = [[row_seed(0, i, k) for k in range(K)] for i in ids]
    stops = list(range(2, 12))                          # a stop set large enough to end samples
    raw = vs.draw(VLLM_PYTHON, folder, prompts, seeds, stops, [16] * len(prompts),
                  temperature=T, top_p=top_p, context=256, memory=0.1, dtype="float32")
    ours = generate(model, None, prompts, num_samples=K, ids=ids, max_new_tokens=16,
                    temperature=T, top_p=top_p, stop_ids=stops)
    good = vs.parity(model, prompts, raw, ours, T, top_p)
    print(vs.describe(good))
    assert good["ok"] and good["tokens"] >= 24, good
    bad = vs.parity(model, prompts, raw, ours, 1.0, top_p)
    print("at T = 1.0:", vs.describe(bad))
    assert not bad["ok"]
    outs = [[vs.finish(r["ids"], set(stops), 16, None) for r in rs] for rs in raw]
    assert all(len(o) == K for o in outs)
    assert all(s["finish_reason"] == "length" or s["stop_token"] in stops for o in outs for s in o)


# A stand-in for vLLM's Python API (LLM, SamplingParams), importable as `vllm` by the child: each
# request's tokens come from its own seed alone, and every generate call is logged, so the test can
# say which samples and which settings came through vLLM's side.
FAKE_VLLM = """
import json, os, random
__version__ = "stand-in"

def draw(seed, max_tokens, stops, vocab):
    rng = random.Random(seed)
    ids = [rng.randrange(3, vocab) for _ in range(rng.randint(1, max_tokens))]
    ids = [i for i in ids if i not in stops] or [3]
    return ids + [stops[0]] if len(ids) < max_tokens and rng.random() < 0.5 else ids

class SamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)

class Out:
    def __init__(self, ids, p):
        self.token_ids, self.logprobs = ids, None
        self.finish_reason = "stop" if ids[-1] in p.stop_token_ids else "length"
        self.stop_reason = ids[-1] if self.finish_reason == "stop" else None

class LLM:
    def __init__(self, model, **kw):
        self.vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
        self.kw = dict(kw, model=model)

    def generate(self, reqs, params, use_tqdm=False):
        with open(os.environ["FAKE_VLLM_LOG"], "a") as f:
            f.write(json.dumps({**self.kw, "requests": len(reqs),
                                "temperature": sorted({p.temperature for p in params}),
                                "top_p": sorted({p.top_p for p in params})}) + "\\n")
        return [type("R", (), {"outputs": [Out(draw(p.seed, p.max_tokens, p.stop_token_ids,
                                                    self.vocab), p)]}) for p in params]
"""


@pytest.fixture()
def fake_vllm_env(tmp_path, monkeypatch):
    """A folder holding the stand-in `vllm` on PYTHONPATH (the child inherits it) -> its module."""
    import importlib.util
    import json

    (tmp_path / "fake" / "vllm").mkdir(parents=True)
    (tmp_path / "fake" / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    monkeypatch.setenv("FAKE_VLLM_LOG", str(tmp_path / "calls.jsonl"))
    spec = importlib.util.spec_from_file_location("fake_vllm", tmp_path / "fake" / "vllm" /
                                                  "__init__.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"say {i}:", "gold": f"gold {i}"}) + "\n")
    (tmp_path / "tjudge.py").write_text("def judge(prompt, candidates):\n    return {'scores': "
                                        "[float(len(set(c)) % 7) for c in candidates]}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return mod


def train_argv(tmp_path, model, *extra):
    return ["--out", str(tmp_path / "run"), "--model", str(model), "--prompts",
            str(tmp_path / "prompts.jsonl"), "--judge", "tjudge:judge", "--iterations", "1",
            "--prompts_per_iter", "6", "--num_val", "4", "--num_samples", "3",
            "--max_new_tokens", "8", "--batch_size", "4", "--micro_batch", "2", *extra]


def test_train_sampler_vllm_draws_line_4_and_the_answers_through_the_child(tiny32, tmp_path,
                                                                          fake_vllm_env):
    """train.py --sampler vllm against the stand-in: the samples stage and both validation
    answer sets are the child's draws from their (prompt, sample) seeds, cut as ours, with the
    run's temperatures and top-p; the manifests record the sampler."""
    import json
    import sys

    import train
    from dnolib.model_io import load_tokenizer
    from dnolib.stages import read_jsonl

    folder, _ = tiny32
    train.main(train_argv(tmp_path, folder, "--sampler", "vllm", "--vllm_python", sys.executable,
                          "--vllm_parity", "0"))
    run = tmp_path / "run"
    calls = [json.loads(s) for s in open(tmp_path / "calls.jsonl")]
    assert [c["temperature"] for c in calls] == [[0.0], [0.7], [0.0]]   # eval 0, line 4, eval 1
    assert [c["requests"] for c in calls] == [4, 18, 4] and {c["top_p"][0] for c in calls} == {0.95}
    assert calls[2]["model"] == str(run / "iter_1" / "checkpoint")
    tok = load_tokenizer(folder)
    stops = default_stop_ids(tok, Transformer.from_pretrained(folder))
    vocab = json.load(open(folder / "config.json"))["vocab_size"]
    for stage, seed in (("iter_1/samples/samples.jsonl", 1), ("iter_1/eval/samples.jsonl", 999)):
        rows = read_jsonl(run / stage)
        assert len(rows) == (6 if "samples/" in stage else 4)
        for r in rows:
            for k, s in enumerate(r["samples"]):
                ids = fake_vllm_env.draw(row_seed(seed, r["id"], k), 8, stops, vocab)
                want = vs.finish(ids, set(stops), 8, tok)
                assert s == want, (stage, r["id"], k)
    for stage in ("samples", "eval"):
        m = json.load(open(run / "iter_1" / stage / "manifest.json"))
        assert m["shape"]["flags"]["sampler"] == "vllm"


def test_train_sampler_vllm_is_refused_in_one_line_before_any_work(tiny32, tmp_path,
                                                                   fake_vllm_env):
    import train

    folder, _ = tiny32
    for extra, want in ((("--sampler", "vllm"), "needs --vllm_python"),
                        (("--sampler", "vllm", "--vllm_python", "/bin/false"),
                         "cannot import vllm")):
        with pytest.raises(SystemExit) as e:
            train.main(train_argv(tmp_path, folder, *extra))
        msg = str(e.value.code)
        assert msg.startswith("error: ") and want in msg and "\n" not in msg
        assert not (tmp_path / "run" / "iter_0").exists()


@pytest.mark.skipif(not VLLM_PYTHON, reason="DNO_VLLM_PYTHON is not set (a python with vLLM)")
def test_train_sampler_vllm_runs_the_loop_resumes_and_records_the_sampler(tiny32, tmp_path):
    """train.py --sampler vllm, one iteration on a tiny task (3 vLLM starts, minutes on 2 cores):
    the samples stage records the sampler, the parity lines say ok, a rerun starts no vLLM, and
    --sampler ours on the same folder is refused in one line."""
    import json
    import subprocess
    import sys

    folder, _ = tiny32
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"say {i}:", "gold": f"gold {i}"}) + "\n")
    (tmp_path / "tjudge.py").write_text("def judge(prompt, candidates):\n    return {'scores': "
                                        "[float(len(set(c)) % 7) for c in candidates]}\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{tmp_path}{os.pathsep}{root}")
    argv = [sys.executable, "train.py", "--out", str(tmp_path / "run"), "--model", str(folder),
            "--prompts", str(tmp_path / "prompts.jsonl"), "--judge", "tjudge:judge",
            "--iterations", "1", "--prompts_per_iter", "6", "--num_val", "4", "--num_samples",
            "3", "--max_new_tokens", "8", "--batch_size", "4", "--micro_batch", "2",
            "--sampler", "vllm", "--vllm_python", VLLM_PYTHON, "--vllm_memory", "0.1"]
    p = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    parity = [s for s in (p.stdout + p.stderr).splitlines() if s.startswith("vLLM parity")]
    print("\n".join(parity))                           # the figures, under pytest -s
    assert len(parity) == 3 and all(s.endswith(": ok") for s in parity), parity
    manifest = json.load(open(tmp_path / "run" / "iter_1" / "samples" / "manifest.json"))
    assert manifest["shape"]["flags"]["sampler"] == "vllm" and manifest["counts"]["samples"] == 18
    again = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "vLLM " not in again.stdout + again.stderr
    ours = [a if a != "vllm" else "ours" for a in argv]
    p = subprocess.run(ours, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "--sampler vllm" in p.stderr.strip().splitlines()[-1]

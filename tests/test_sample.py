"""sample.py: cached greedy == naive recomputation == transformers; seeded sampling; stops; prompts; CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import sample
from model import Transformer
from sample import encode_prompt, generate, naive_greedy, sample_tokens
from tiny import make_hf_model, make_tokenizer

torch.set_num_threads(1)
PROMPTS = ["The cat", "A much longer prompt here, yes", "Hi", [{"role": "user", "content": "2+2?"}]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    make_hf_model("llama", d)
    return d, Transformer.from_pretrained(d), make_tokenizer()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_cached_equals_naive_and_transformers(arch, tmp_path):
    make_hf_model(arch, tmp_path)
    model, tok = Transformer.from_pretrained(tmp_path), make_tokenizer()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    encoded = [encode_prompt(tok, p) for p in PROMPTS]
    assert len({len(e) for e in encoded}) == len(encoded)  # different lengths -> real left padding
    n = 12
    ours = [o[0] for o in generate(model, tok, PROMPTS, max_new_tokens=n, temperature=0, stop_ids=[])]
    assert all(len(o["tokens"]) == n and o["finish_reason"] == "length" for o in ours)
    assert [o["tokens"] for o in ours] == naive_greedy(model, encoded, n)
    idx, mask = sample.left_pad(encoded)
    with torch.no_grad():
        ref = hf.generate(idx, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                          eos_token_id=None)[:, idx.shape[1]:]
    assert [o["tokens"] for o in ours] == ref.tolist()


def test_samples_differ_and_are_reproducible_across_batches(tiny):
    _, model, tok = tiny
    kw = dict(num_samples=5, max_new_tokens=10, temperature=1.0, top_p=0.95, seed=7, stop_ids=[])
    alone = generate(model, tok, ["The cat"], ids=["cat"], **kw)[0]
    firsts = [s["tokens"][0] for s in alone]
    assert len(set(firsts)) > 1  # the K samples differ from the first token on
    assert len({tuple(s["tokens"]) for s in alone}) == 5
    batch = generate(model, tok, ["Hi", "The cat", "Another prompt"], ids=["hi", "cat", "x"], **kw)
    assert batch[1] == alone  # same (id, sample index, seed) -> same sample, whatever the batch
    assert model.layers[0].self_attn.cache is None  # generate frees its KV cache
    small = generate(model, tok, ["Hi", "The cat", "Another prompt"], ids=["hi", "cat", "x"], batch_size=1, **kw)
    assert small == batch
    other = generate(model, tok, ["The cat"], ids=["cat"], **dict(kw, seed=8))[0]
    assert other != alone


def test_sample_tokens_top_p_and_temperature():
    n = 40000
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(n, 4)
    u = torch.rand(n, 3, generator=torch.Generator().manual_seed(0))

    def freqs(tok):
        return torch.bincount(tok, minlength=4).float() / n

    # nucleus at 0.7 = {0, 1} (mass 0.8) renormalised to 0.625 / 0.375, via rejection (CPU) and via sorting
    assert (freqs(sample_tokens(logits, u, 1.0, 0.7)) - torch.tensor([0.625, 0.375, 0, 0])).abs().max() < 0.01
    grid = (torch.arange(1000) + 0.5) / 1000
    sorted_tok = sample._sample_sorted(torch.tensor([[0.5, 0.3, 0.15, 0.05]]).expand(1000, 4), grid, 0.7)
    assert (sorted_tok == 0).sum().item() == 625 and (sorted_tok == 1).sum().item() == 375
    # top_p 0.3 keeps only token 0: a quarter of the rows miss with both candidates and take the sorted fallback
    assert sample_tokens(logits, u, 1.0, 0.3).eq(0).all()
    assert (freqs(sample_tokens(logits, u, 1.0, 1.0)) - torch.tensor([0.5, 0.3, 0.15, 0.05])).abs().max() < 0.01
    assert sample_tokens(logits, u, 0, 0.7).eq(0).all()  # temperature 0 = greedy
    cold = freqs(sample_tokens(logits, u, 0.25, 1.0))  # p^4 sharpened: token 0 gets 0.0625 / 0.0711 = 0.879
    assert abs(cold[0].item() - 0.879) < 0.01


def test_stop_ids_and_finish_reasons(tiny):
    _, model, tok = tiny
    greedy = generate(model, tok, PROMPTS, max_new_tokens=6, temperature=0, stop_ids=[])
    third = greedy[0][0]["tokens"][2]
    out = generate(model, tok, PROMPTS, max_new_tokens=6, temperature=0, stop_ids=[third])
    first = greedy[0][0]["tokens"]
    assert out[0][0] == {"tokens": first[:first.index(third)], "finish_reason": "stop",
                         "text": tok.decode(first[:first.index(third)], skip_special_tokens=True)}
    for g, o in zip(greedy, out):  # each row stops on its own
        if third not in g[0]["tokens"]:
            assert o[0]["tokens"] == g[0]["tokens"] and o[0]["finish_reason"] == "length"
    everything = generate(model, tok, ["Hi"], num_samples=3, max_new_tokens=5, stop_ids=range(len(tok)))
    assert all(s["tokens"] == [] and s["finish_reason"] == "stop" for s in everything[0])
    assert set(sample.default_stop_ids(tok, model)) == {2, tok.convert_tokens_to_ids("<|im_end|>")}


def test_encode_prompt_and_context_errors(tiny):
    _, model, tok = tiny
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.decode(encode_prompt(tok, msgs)) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert encode_prompt(tok, "ab") == tok("ab")["input_ids"]
    with pytest.raises(ValueError, match="prompt must be"):
        encode_prompt(tok, [{"role": "user"}])
    with pytest.raises(ValueError, match="context is 256 tokens"):
        generate(model, tok, ["x" * 300], max_new_tokens=2)
    out = generate(model, tok, ["x" * 250], max_new_tokens=20, temperature=0, stop_ids=[])[0][0]
    assert len(out["tokens"]) == 6 and out["finish_reason"] == "length"  # capped at the context


def test_cli_writes_jsonl_and_reports_bad_lines(tiny, tmp_path, capsys):
    d, _, _ = tiny
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "The cat"}) + "\n\n"
                   + json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["--model", str(d), "--prompts", str(src), "--out", str(out), "--num_samples", "3",
            "--max_new_tokens", "5", "--temperature", "0.7", "--top_p", "0.95", "--seed", "1"]
    sample.run(sample.cli(sample.Config, argv))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", 3] and rows[1]["prompt"][0]["content"] == "hi"
    assert all(len(r["samples"]) == 3 and len(r["finish_reasons"]) == 3 for r in rows)
    for bad, msg in [('{"id": 1, "prompt": "ok"}\n{"prompt": \n', "in.jsonl:2: malformed JSON"),
                     ('{"id": 1}\n', "in.jsonl:1: missing 'prompt'"),
                     ('{"prompt": [{"role": "user"}]}\n', "in.jsonl:1: 'prompt' must be")]:
        src.write_text(bad)
        with pytest.raises(ValueError, match=msg):
            sample.run(sample.cli(sample.Config, argv))
    src.write_text('{"prompt": "ok"}\n')
    with pytest.raises(FileNotFoundError, match="config.json"):
        sample.run(sample.cli(sample.Config, ["--model", str(tmp_path / "none")] + argv[2:]))


def test_cli_error_is_one_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "sample.py"), "--model", str(tmp_path), "--prompts",
                        str(src), "--out", str(tmp_path / "o.jsonl")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "in.jsonl:2:" in r.stderr

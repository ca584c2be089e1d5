"""sample.py, sample.py, top_p.py: cached greedy == naive recomputation == transformers; seeded sampling; stops and compaction; top-p
sampling paths; the compiled step; prompts; CLI."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import sample
from dnolib.model import Transformer
from dnolib.model_io import ModelError
from sample import (_rows_to_keep, default_stop_ids, encode_prompt, generate, left_pad, naive_greedy,
                      right_pad, row_seed)
from dnolib.top_p import _sample_sorted, _sample_top, sample_tokens
from tiny import hub_snapshot, make_hf_model, make_tokenizer, offline_hub

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
    idx, mask = left_pad(encoded)
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
    small = generate(model, tok, ["Hi", "The cat", "Another prompt"], ids=["hi", "cat", "x"], rows=1, **kw)
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
    sorted_tok = _sample_sorted(torch.tensor([[0.5, 0.3, 0.15, 0.05]]).expand(1000, 4), grid, 0.7)
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
    assert out[0][0] == {"tokens": first[:first.index(third)], "finish_reason": "stop", "stop_token": third,
                         "text": tok.decode(first[:first.index(third)], skip_special_tokens=True)}
    for g, o in zip(greedy, out):  # each row stops on its own
        if third not in g[0]["tokens"]:
            assert o[0]["tokens"] == g[0]["tokens"] and o[0]["finish_reason"] == "length"
            assert o[0]["stop_token"] is None
    everything = generate(model, tok, ["Hi"], num_samples=3, max_new_tokens=5, stop_ids=range(len(tok)))
    assert all(s["tokens"] == [] and s["finish_reason"] == "stop" for s in everything[0])
    assert set(default_stop_ids(tok, model)) == {2, tok.convert_tokens_to_ids("<|im_end|>")}


def first_stop(tokens, stops):  # index of the first stop id in a list of tokens, or None
    return next((j for j, t in enumerate(tokens) if t in stops), None)


def test_two_stop_ids_record_which_one_ended_each_sample(tiny):
    _, model, tok = tiny
    kw = dict(num_samples=8, max_new_tokens=30, temperature=1.0, top_p=0.95, seed=3, ids=list("abcd"))
    free = generate(model, tok, PROMPTS, stop_ids=[], **kw)
    stops = {83, 54}
    out = generate(model, tok, PROMPTS, stop_ids=sorted(stops), **kw)
    seen = set()
    for f, o in zip(free, out):
        for fs, os_ in zip(f, o):
            cut = first_stop(fs["tokens"], stops)
            if cut is None:
                assert os_ == {**fs, "stop_token": None} and os_["finish_reason"] == "length"
            else:  # the same sample, cut at its first stop id, which is recorded
                assert os_["tokens"] == fs["tokens"][:cut] and os_["finish_reason"] == "stop"
                assert os_["stop_token"] == fs["tokens"][cut]
                seen.add(os_["stop_token"])
    assert seen == stops  # both ids ended some sample


def naive_sample(model, prompt, seed, max_new_tokens, temperature, top_p, stops):
    """Test oracle for one (prompt, sample): recompute the whole sequence every step, no cache, no batch; the
    same uniforms as the sampler's row (torch.rand(M, 3) from the row's seed)."""
    u = torch.rand(max_new_tokens, 3, generator=torch.Generator().manual_seed(seed))
    idx = torch.tensor([prompt])
    with torch.no_grad():
        for t in range(max_new_tokens):
            tok = sample_tokens(model(idx)[:, -1], u[t:t + 1], temperature, top_p)  # (1,)
            if int(tok) in stops:
                return idx[0, len(prompt):].tolist(), int(tok)
            idx = torch.cat([idx, tok[:, None]], 1)
    return idx[0, len(prompt):].tolist(), None


def test_continuous_batching_keeps_rows_full_and_changes_no_sample(tiny, monkeypatch):
    _, model, tok = tiny
    sizes, decode = [], model.decode

    def recorded(tok_, kv_len):
        sizes.append(len(tok_))
        return decode(tok_, kv_len)

    monkeypatch.setattr(model, "decode", recorded)
    encoded = [encode_prompt(tok, p) for p in PROMPTS]
    naive = naive_greedy(model, encoded, 24)
    stops = {83, 54}  # greedy rows stop at steps 1, 7, 3 and 14
    greedy = generate(model, tok, PROMPTS, max_new_tokens=24, temperature=0, stop_ids=sorted(stops))
    for n, g in zip(naive, greedy):  # greedy == naive recomputation cut at the first stop id
        assert first_stop(n, stops) is not None and g[0]["tokens"] == n[:first_stop(n, stops)]
    assert sizes == [4] * 14  # the longest row's 14 steps; never below MIN_ROWS = 4 rows
    kw = dict(num_samples=8, max_new_tokens=40, temperature=1.0, top_p=0.95, seed=3, stop_ids=[83, 54, 18, 48, 98])
    ids = list("abcd")
    sizes.clear()
    base = generate(model, tok, PROMPTS, ids=ids, rows=6, **kw)  # 32 jobs through 6 rows
    assert len({s["finish_reason"] for o in base for s in o}) == 2
    tokens = sum(min(len(s["tokens"]) + 1, 40) for o in base for s in o)  # decode steps the jobs need
    full = next(i for i, n in enumerate(sizes) if n < 6)
    assert set(sizes[:full]) == {6} and sizes == sorted(sizes, reverse=True)  # full, then drained
    assert sizes[-1] == 4  # drained down to MIN_ROWS, no further
    assert 6 * full >= tokens - 6 * 40 and sum(sizes) < tokens + 6 * 40  # full until the queue ran dry
    for i, k in [(0, 0), (1, 5), (2, 7), (3, 3)]:  # == the uncached oracle, row by row
        got = base[i][k]
        assert (got["tokens"], got["stop_token"]) == naive_sample(
            model, encoded[i], row_seed(3, ids[i], k), 40, 1.0, 0.95, set(kw["stop_ids"]))
    for other in (dict(rows=1), dict(rows=32), dict(rows=7, refill=False), dict(rows=32, compact=False),
                  dict(rows=8, refill=False, compact=False)):  # batch sizes, lock-step batches, lock-step
        assert generate(model, tok, PROMPTS, ids=ids, **kw, **other) == base, other
    perm = [2, 0, 3, 1]
    shuffled = generate(model, tok, [PROMPTS[i] for i in perm], ids=[ids[i] for i in perm], rows=3, **kw)
    assert [shuffled[perm.index(i)] for i in range(4)] == base
    assert generate(model, tok, PROMPTS[2:3], ids=ids[2:3], **kw)[0] == base[2]


def test_lock_step_batches_start_at_full_width_after_compaction(tiny, monkeypatch):
    """generate(refill=False): every lock-step batch decodes its first step at `rows` rows, though
    the batch before it was compacted (the bug: later batches kept the shrunken width)."""
    _, model, tok = tiny
    events, decode, prefill = [], model.decode, model.prefill

    def recorded_decode(tok_, kv_len):
        events.append(len(tok_))
        return decode(tok_, kv_len)

    def recorded_prefill(*a):
        events.append("prefill")
        return prefill(*a)

    monkeypatch.setattr(model, "decode", recorded_decode)
    monkeypatch.setattr(model, "prefill", recorded_prefill)
    kw = dict(num_samples=8, max_new_tokens=40, temperature=1.0, top_p=0.95, seed=3,
              stop_ids=[83, 54, 18, 48, 98], ids=list("abcd"))
    lock = generate(model, tok, PROMPTS, rows=8, refill=False, **kw)  # 4 batches of one prompt x 8
    firsts = [events[i + 1] for i, e in enumerate(events) if e == "prefill"]
    assert firsts == [8, 8, 8, 8]  # old code: [8, 2, 1, 1, 1, ...]: the shrunken width
    assert min(e for e in events if e != "prefill") < 8  # batches were compacted as rows stopped
    assert lock == generate(model, tok, PROMPTS, rows=8, **kw)  # the samples do not change


def test_logits_do_not_depend_on_the_batch_width(tiny):
    """A prompt's first-token logits are bitwise the same prefilled alone or beside 5 others (at
    the same padded length: CPU attention rounds differently at other lengths), and its decode
    logits the same at every width >= MIN_ROWS (CPU BLAS rounds 1-3-row matmuls differently, so
    the sampler never runs fewer rows: this fails with MIN_ROWS = 1)."""
    _, model, tok = tiny
    prompts = [encode_prompt(tok, p) for p in PROMPTS + ["x y z", "one more prompt"]]
    idx, lens = right_pad(prompts)
    model.setup_cache(len(prompts), 64)
    with torch.no_grad():
        together = model.prefill(idx, lens, torch.arange(6), torch.arange(6))  # (6, V)
        alone = model.prefill(idx[2:3], lens[2:3], torch.tensor([0]), torch.tensor([0]))  # (1, V)
        assert torch.equal(alone[0], together[2])
        step = torch.tensor([5, 9, 11, 13, 17, 19])
        model.setup_cache(6, 64)
        model.prefill(idx, lens, torch.arange(6), torch.arange(6))
        wide = model.decode(step, int(lens.max()) + 1)  # (6, V)
        model.setup_cache(4, 64)
        model.prefill(idx[2:6], lens[2:6], torch.arange(4), torch.arange(4))
        narrow = model.decode(step[2:6], int(lens.max()) + 1)  # (4, V)
    model.clear_cache()
    assert torch.equal(narrow, wide[2:6])


def chi_square(tok, p, top_p):
    """Pearson's statistic of draws tok (n,) against the nucleus of p (V,) renormalised, and its degrees of
    freedom; inf if a draw falls outside the nucleus."""
    order = p.argsort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order] = (p[order].cumsum(0) - p[order]) < top_p  # the mass above each token < top_p
    counts = torch.bincount(tok, minlength=len(p)).double()
    if counts[~keep].sum() > 0:
        return math.inf, int(keep.sum()) - 1
    expected = len(tok) * p.double()[keep] / p.double()[keep].sum()
    return ((counts[keep] - expected) ** 2 / expected).sum().item(), int(keep.sum()) - 1


def test_sorted_top_p_path_matches_the_nucleus_on_cpu():
    n, V = 100_000, 40
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(2 * torch.randn(V, generator=g), -1)
    logits, u = p.log().expand(n, V), torch.rand(n, 3, generator=g)
    for top_p in (0.8, 0.95):
        for sort in (True, False):  # the CUDA path (sorted) forced on CPU, and the CPU rejection path
            stat, df = chi_square(sample_tokens(logits, u, 1.0, top_p, sort=sort), p, top_p)
            # chi2(df) has mean df and sd sqrt(2 df): 8 sd is never exceeded by chance (p < 1e-6), on any machine
            assert df >= 5 and stat < df + 8 * math.sqrt(2 * df), (top_p, sort, stat, df)
        wrong, df = chi_square(sample_tokens(logits, u, 1.0, top_p - 0.1, sort=True), p, top_p)
        assert wrong > df + 8 * math.sqrt(2 * df)  # the test sees a wrong top_p


def test_top_k_nucleus_equals_the_full_sort():
    """The CPU fallback's nucleus from topk (grown x4 until it holds top_p) draws exactly what sorting the
    whole vocabulary draws, also when the nucleus is wider than the first k."""
    g = torch.Generator().manual_seed(1)
    for scale in (0.1, 1.0, 8.0):  # flat (nucleus of hundreds of tokens) to peaked (a few)
        probs = torch.softmax(scale * torch.randn(50, 1000, generator=g), -1)
        u = torch.rand(50, generator=g)
        for top_p in (0.5, 0.95, 1.0):
            want = _sample_sorted(probs, u, top_p)
            assert torch.equal(_sample_top(probs, u, top_p, k=16), want), (scale, top_p)


def inductor_error():
    """Why torch.compile's default backend cannot run here, or None (e.g. no C compiler)."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(3))
    except Exception as e:  # noqa: BLE001 - any backend failure means: skip
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


@pytest.mark.slow
def test_compiled_decode_equals_eager_on_cpu(tiny):
    err = inductor_error()
    if err:
        pytest.skip(f"torch.compile (inductor) cannot run here: {err}")
    d, _, tok = tiny
    model = Transformer.from_pretrained(d)  # its own copy: compiling keeps state on the model
    kw = dict(max_new_tokens=12, temperature=0, stop_ids=[])  # one decode shape: one compilation (~30 s)
    eager = generate(model, tok, PROMPTS, **kw)
    compiled = generate(model, tok, PROMPTS, compile=True, **kw)  # mode="default" on CPU (no CUDA graphs)
    assert compiled == eager and model.compiled_decode is not None
    # under compile the batch only halves (finished rows pad it), so few shapes get compiled
    busy = torch.tensor([0, 1, 0, 1, 1, 0, 0, 0], dtype=torch.bool)
    assert _rows_to_keep(busy, static=True).tolist() == [0, 1, 3, 4]  # rows 1, 3, 4 + idle 0: 8 / 2
    assert _rows_to_keep(busy, static=False).tolist() == [1, 3, 4]


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
    assert all(len(r["stop_tokens"]) == 3 and all(t in (None, 2, 4) for t in r["stop_tokens"]) for r in rows)
    for bad, msg in [('{"id": 1, "prompt": "ok"}\n{"prompt": \n', "in.jsonl:2: malformed JSON"),
                     ('{"id": 1}\n', "in.jsonl:1: missing 'prompt'"),
                     ('{"prompt": [{"role": "user"}]}\n', "in.jsonl:1: 'prompt' must be")]:
        src.write_text(bad)
        with pytest.raises(ValueError, match=msg):
            sample.run(sample.cli(sample.Config, argv))
    src.write_text('{"prompt": "ok"}\n')
    with pytest.raises(ModelError, match="none: no such folder, and not a Hugging Face id ORG/NAME"):
        sample.run(sample.cli(sample.Config, ["--model", str(tmp_path / "none")] + argv[2:]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="empty: folder has no config.json"):
        sample.run(sample.cli(sample.Config, ["--model", str(tmp_path / "empty")] + argv[2:]))


def test_cli_resolves_a_hub_id_like_transformers(tiny, tmp_path, monkeypatch):
    """--model ORG/NAME is the cached snapshot of that id (HF_HUB_CACHE, offline): the same samples as the folder;
    an id that is not cached is a one-line error, before any model loads."""
    d, _, _ = tiny
    hub_snapshot(offline_hub(tmp_path, monkeypatch), "tiny-org/tiny-llama", d)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "The cat"}) + "\n" + json.dumps({"id": "b", "prompt": "Hi"}))
    flags = ["--prompts", str(src), "--num_samples", "2", "--max_new_tokens", "6", "--seed", "3"]
    for model, out in [(str(d), "folder.jsonl"), ("tiny-org/tiny-llama", "hub.jsonl")]:
        sample.run(sample.cli(sample.Config, ["--model", model, "--out", str(tmp_path / out)] + flags))
    hub = [json.loads(line) for line in (tmp_path / "hub.jsonl").read_text().splitlines()]
    assert [r["id"] for r in hub] == ["a", "b"] and all(len(r["samples"]) == 2 for r in hub)
    assert (tmp_path / "hub.jsonl").read_text() == (tmp_path / "folder.jsonl").read_text()
    with pytest.raises(ModelError, match="--model tiny-org/missing: not in the Hugging Face cache") as e:
        sample.run(sample.cli(sample.Config, ["--model", "tiny-org/missing", "--out", str(tmp_path / "x.jsonl")]
                              + flags))
    assert "\n" not in str(e.value) and not (tmp_path / "x.jsonl").exists()


def test_cli_checks_flags_device_and_out_before_loading(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "ok"}\n')
    base = ["--model", str(tmp_path / "no_model"), "--prompts", str(src), "--out", str(tmp_path / "o.jsonl")]
    for flags, msg in [(["--num_samples", "0"], "num_samples must be"), (["--max_new_tokens", "0"], "max_new_tokens"),
                       (["--temperature", "-1"], "temperature must be"), (["--temperature", "nan"], "temperature"),
                       (["--top_p", "0"], "top_p must be"), (["--top_p", "1.5"], "top_p must be"),
                       (["--rows", "-1"], "rows must be"), (["--dtype", "int8"], "unknown --dtype"),
                       (["--device", "tpu9"], "--device"), (["--device", "cuda:99"], "cuda:99")]:
        with pytest.raises(ValueError, match=msg):  # not the missing model's FileNotFoundError: checked first
            sample.run(sample.cli(sample.Config, base + flags))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="0 CUDA GPU"):
            sample.run(sample.cli(sample.Config, base + ["--device", "cuda"]))
    with pytest.raises(FileNotFoundError, match="--out folder .*missing does not exist"):
        sample.run(sample.cli(sample.Config, base[:-1] + [str(tmp_path / "missing" / "o.jsonl")]))
    with pytest.raises(PermissionError, match="cannot write"):
        sample.run(sample.cli(sample.Config, base[:-1] + [str(tmp_path)]))


def test_cli_error_is_one_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "sample.py"), "--model", str(tmp_path), "--prompts",
                        str(src), "--out", str(tmp_path / "o.jsonl")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "in.jsonl:2:" in r.stderr

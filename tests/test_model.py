"""model.py against transformers (an implementation we did not write): logits, checkpoint round trips, cache."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from dnolib.model import ModelArgs, Transformer
from tiny import make_hf_model, make_tokenizer

torch.set_num_threads(1)
ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


def padded_batch(vocab, lengths, seed=0):
    """Left-padded random batch: idx (B, T), mask (B, T), rope positions (B, T)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    idx = torch.randint(5, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros_like(idx)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
        idx[b, :T - n] = 0
    return idx, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch, tmp_path):
    hf = make_hf_model(arch, tmp_path / arch)
    ours = Transformer.from_pretrained(tmp_path / arch)
    if arch == "llama":
        assert ours.args.n_kv_heads < ours.args.n_heads and ours.args.rope_scaling["rope_type"] == "llama3"
    if arch == "qwen2":
        assert ours.args.qkv_bias and ours.args.tie_embeddings and ours.lm_head.weight is ours.embed_tokens.weight
    idx, mask, pos = padded_batch(ours.args.vocab_size, [13, 7, 2, 10])
    with torch.no_grad():
        ref = hf(idx, attention_mask=mask, position_ids=pos).logits
        got = ours(idx, attention_mask=mask)
        real = mask.bool()
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert (got - ref)[real].abs().max().item() < 1e-4
        assert torch.isfinite(got).all()  # padded queries stay finite
        # the training path: no mask, fused causal attention
        assert (ours(idx) - hf(idx).logits).abs().max().item() < 1e-4


def test_mistral_sliding_window_matches_transformers(tmp_path):
    hf = make_hf_model("mistral", tmp_path / "m", sliding_window=4)
    hf.config._attn_implementation = "eager"
    ours = Transformer.from_pretrained(tmp_path / "m")
    assert ours.args.sliding_window == 4
    idx, mask, pos = padded_batch(ours.args.vocab_size, [12, 9])
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() < 1e-4
        ref = hf(idx, attention_mask=mask, position_ids=pos).logits
        assert (ours(idx, attention_mask=mask) - ref)[mask.bool()].abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_save_pretrained_round_trip(arch, tmp_path):
    make_hf_model(arch, tmp_path / "hf")
    ours = Transformer.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours", tokenizer=make_tokenizer())
    assert (tmp_path / "ours" / "tokenizer.json").is_file() and (tmp_path / "ours" / "model.safetensors").is_file()
    hf2 = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").float().eval()
    idx, _, _ = padded_batch(ours.args.vocab_size, [9, 9])
    with torch.no_grad():
        hf_orig = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(idx).logits
        assert torch.equal(hf2(idx).logits, hf_orig)  # identical weights and config -> identical logits
        assert torch.equal(Transformer.from_pretrained(tmp_path / "ours")(idx), ours(idx))
        assert (ours(idx) - hf_orig).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fresh_model_loads_in_transformers(arch, tmp_path):
    """A model built from ModelArgs alone (as demo_task.py does) writes a config transformers understands."""
    torch.manual_seed(0)
    rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=16) if arch == "llama" else {}
    args = ModelArgs(arch=arch, vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                     max_seq_len=64, rope_theta=5e5, rope_scaling=rope, qkv_bias=arch == "qwen2",
                     tie_embeddings=arch == "qwen2", eos_token_id=2)
    ours = Transformer(args).eval()
    ours.save_pretrained(tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    idx = torch.randint(0, 97, (2, 40))  # past original_max_position_embeddings: the rope scaling matters
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() < 1e-4


def test_bfloat16_load(tmp_path):
    make_hf_model("qwen2", tmp_path / "m")
    m32, m16 = Transformer.from_pretrained(tmp_path / "m"), Transformer.from_pretrained(tmp_path / "m", torch.bfloat16)
    assert m16.embed_tokens.weight.dtype == torch.bfloat16 and m16.inv_freq.dtype == torch.float32
    idx, _, _ = padded_batch(m32.args.vocab_size, [8])
    with torch.no_grad():
        a, b = m32(idx), m16(idx)
    assert b.dtype == torch.float32 and (a - b).abs().max().item() < 0.1


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_cache_prefill_decode_equals_full_forward(arch, tmp_path):
    """prefill 3 prompts into 6 rows (2 each), decode; then row 4 restarts from another prompt (copy_rows) while
    the others go on: every step's logits equal the uncached forward of that row's own sequence."""
    make_hf_model(arch, tmp_path / "m")
    m = Transformer.from_pretrained(tmp_path / "m")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, m.args.vocab_size, (n,), generator=g) for n in (6, 3, 5)]
    seqs = [prompts[r // 2] for r in range(6)]  # each row's tokens so far
    idx = torch.zeros(3, 6, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, :len(p)] = p
    with torch.no_grad():
        m.setup_cache(6, 16)
        first = m.prefill(idx, torch.tensor([6, 3, 5]), torch.arange(6), torch.arange(3).repeat_interleave(2))
        for b, p in enumerate(prompts):
            assert (first[b] - m(p[None])[0, -1]).abs().max().item() < 1e-4
        for t in range(6):
            if t == 3:  # row 4 (prompt 2) restarts as a copy of row 1's prompt (prompt 0, 6 tokens)
                m.copy_rows(torch.tensor([1]), torch.tensor([4]), torch.tensor([6]))
                seqs[4] = prompts[0]
            new = torch.randint(5, m.args.vocab_size, (6,), generator=g)
            seqs = [torch.cat([s, new[r:r + 1]]) for r, s in enumerate(seqs)]
            got = m.decode(new, max(len(s) for s in seqs))
            for r, s in enumerate(seqs):
                assert (got[r] - m(s[None])[0, -1]).abs().max().item() < 1e-4, (t, r)


def test_keep_rows_then_decode_equals_full_forward_and_setup_cache_restores(tmp_path):
    """The sampler's compaction: after keep_rows the kept rows decode exactly as the uncached forward; the next
    setup_cache hands back the same full-size tensors (compiled graphs point at them), not new ones."""
    make_hf_model("mistral", tmp_path / "m", sliding_window=4)
    m = Transformer.from_pretrained(tmp_path / "m")
    assert m.args.sliding_window == 4
    idx, mask, _ = padded_batch(m.args.vocab_size, [6, 3, 5, 4], seed=3)
    lens = mask.sum(-1)
    idx = torch.stack([torch.cat([i[m_.bool()], i[~m_.bool()]]) for i, m_ in zip(idx, mask)])  # right-padded
    steps, keep = 6, torch.tensor([1, 3])
    new = torch.randint(5, m.args.vocab_size, (4, steps), generator=torch.Generator().manual_seed(4))
    S = idx.shape[1] + steps
    with torch.no_grad():
        m.setup_cache(4, S)
        full = [m.layers[1].self_attn.cache.k, m.key_valid, m.next_pos]
        m.prefill(idx, lens, torch.arange(4), torch.arange(4))
        for t in range(steps - 1):
            if t == 2:
                m.keep_rows(keep, int(lens.max()) + t)  # slots written so far
                assert m.layers[1].self_attn.cache.v.shape[0] == m.next_pos.shape[0] == 2
            rows = keep if t >= 2 else torch.arange(4)
            got = m.decode(new[rows, t], S)  # the full cache length, as under compile
            for j, r in enumerate(rows.tolist()):
                ref = m(torch.cat([idx[r, :lens[r]], new[r, :t + 1]])[None])[0, -1]
                assert (got[j] - ref).abs().max().item() < 1e-4
        m.setup_cache(4, S)
    again = [m.layers[1].self_attn.cache.k, m.key_valid, m.next_pos]
    assert all(a is b and a.shape[0] == 4 for a, b in zip(again, full))


def test_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(tmp_path / "nothing")
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture.*LlamaForCausalLM") as e:
        Transformer.from_pretrained(d)
    assert "\n" not in str(e.value)
    make_hf_model("llama", tmp_path / "l")
    (tmp_path / "l" / "model.safetensors").rename(tmp_path / "l" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors") as e:
        Transformer.from_pretrained(tmp_path / "l")
    assert "\n" not in str(e.value)
    cfg = json.loads((tmp_path / "l" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    (tmp_path / "l" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_type"):
        Transformer.from_pretrained(tmp_path / "l")


def test_sharded_checkpoint(tmp_path):
    hf = make_hf_model("mistral")
    hf.save_pretrained(tmp_path / "s", max_shard_size="40KB")
    assert (tmp_path / "s" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "s").glob("model-*.safetensors"))) > 1
    ours = Transformer.from_pretrained(tmp_path / "s")
    idx, _, _ = padded_batch(ours.args.vocab_size, [7])
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() < 1e-4
    next((tmp_path / "s").glob("model-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="shard"):
        Transformer.from_pretrained(tmp_path / "s")


def test_checkpoint_keeps_its_dtype(tmp_path):
    """A bf16 folder loaded in float32 (as train.py does) and saved again stays bf16, same size; dtype= overrides."""
    make_hf_model("qwen3", tmp_path / "m")
    Transformer.from_pretrained(tmp_path / "m").save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    m = Transformer.from_pretrained(tmp_path / "bf16")
    assert m.embed_tokens.weight.dtype == torch.float32
    m.save_pretrained(tmp_path / "again")
    size = lambda d: (tmp_path / d / "model.safetensors").stat().st_size  # noqa: E731
    assert size("again") == size("bf16")
    again = Transformer.from_pretrained(tmp_path / "again")
    assert again.save_dtype == torch.bfloat16
    assert json.loads((tmp_path / "again" / "config.json").read_text())["dtype"] == "bfloat16"
    for k, v in m.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    m.save_pretrained(tmp_path / "fp32", dtype=torch.float32)
    assert size("fp32") > 1.9 * size("bf16")
    assert Transformer.from_pretrained(tmp_path / "fp32").save_dtype == torch.float32

"""Tiny, local, random models and tokenizers for the tests: no hub, no network, built in milliseconds.

    from tiny import make_tokenizer, make_hf_model
    tok = make_tokenizer(tmp_path / "tok")
    hf = make_hf_model("llama", tmp_path / "llama")      # saved with its tokenizer; returns the HF module
    cache = offline_hub(tmp_path, monkeypatch)           # an empty hub cache, HF_HUB_OFFLINE=1
    hub_snapshot(cache, "tiny-org/tiny-llama", tmp_path / "llama")  # now resolve_model("tiny-org/tiny-llama") works
"""
import hashlib
import os
import shutil
import string

import torch


def make_tokenizer(path=None):
    """A char-level PreTrainedTokenizerFast (printable ASCII + 5 specials, 102 ids) with a ChatML template:
    <pad>=0 <s>=1 </s>=2 <|im_start|>=3 <|im_end|>=4; plain text gets no BOS."""
    from demo import sft as demo_sft
    return demo_sft.make_tokenizer(path, chars=[c for c in string.printable if c not in "\r\x0b\x0c"])


def hf_config(arch, vocab_size, **overrides):
    """A transformers config for a tiny model of one of our supported architectures."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        common.update(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=64), tie_word_embeddings=False)
        cls = LlamaConfig
    elif arch == "mistral":
        common.update(rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False)
        cls = MistralConfig
    elif arch == "qwen2":
        common.update(rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False)
        cls = Qwen2Config
    elif arch == "qwen3":
        common.update(rope_theta=1000000.0, tie_word_embeddings=True, head_dim=32, use_sliding_window=False)
        cls = Qwen3Config
    else:
        raise ValueError(f"unknown test architecture {arch!r}")
    common.update(overrides)
    return cls(**common)


def make_hf_model(arch, path=None, seed=0, **overrides):
    """A random tiny transformers model of `arch` in float32, saved with the tokenizer into `path` if given."""
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch, len(tok), **overrides)).float().eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0; perturb them so the tests see them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    if path is not None:
        model.save_pretrained(str(path))
        tok.save_pretrained(str(path))
    return model


def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache under tmp_path, found through HF_HOME / HF_HUB_CACHE, with HF_HUB_OFFLINE=1
    so nothing is ever downloaded. Returns the cache folder."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def hub_snapshot(cache, repo_id, src):
    """Lay out src's files the way huggingface_hub caches a download: models--ORG--NAME/{refs/main, blobs,
    snapshots/<commit>/file -> ../../blobs/<sha256>}. Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in src.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return snap


if __name__ == "__main__":
    import sys, tempfile
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: demo_sft

    with tempfile.TemporaryDirectory() as d:
        tok = make_tokenizer(d + "/tok")
        ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False)
        print(len(tok), ids, repr(tok.decode(ids)))
        for arch in ("llama", "mistral", "qwen2", "qwen3"):
            m = make_hf_model(arch, f"{d}/{arch}")
            print(arch, sum(p.numel() for p in m.parameters()), m(torch.tensor([ids])).logits.shape)

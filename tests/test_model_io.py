"""model_io.py and budget.py (and model.py's edges): hub ids through an offline cache, refused custom code, one-line errors for
broken folders, memory estimates checked against hand counts, generation_config.json kept, bf16 on CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dnolib import model
from dnolib import budget as B
from dnolib import model_io as M
from dnolib.model import ModelArgs, Transformer
from dnolib.model_io import ModelError
from tiny import hf_config, hub_snapshot, make_hf_model, offline_hub

torch.set_num_threads(1)
GiB = 2**30


def one_line(e):
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    return offline_hub(tmp_path, monkeypatch)


def test_resolve_model_from_offline_hub_cache(tmp_path, offline):
    hf = make_hf_model("qwen2", tmp_path / "src")
    snap = hub_snapshot(offline, "tiny-org/tiny-qwen", tmp_path / "src")
    path = M.resolve_model("tiny-org/tiny-qwen")
    assert os.path.samefile(path, snap)
    ours, tok = Transformer.from_pretrained(path), M.load_tokenizer(path)
    idx = torch.tensor([tok.encode("hello there")])
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() < 1e-4
    assert M.resolve_model(str(tmp_path / "src")) == str(tmp_path / "src")  # a local folder is returned as is


def test_resolve_model_errors_are_one_line(tmp_path, offline):
    with pytest.raises(ModelError) as e:
        M.resolve_model("Qwen/Qwen2.5-0.5B-Instruct")
    msg = one_line(e)
    assert "--model Qwen/Qwen2.5-0.5B-Instruct: not in the Hugging Face cache" in msg
    assert f"HF_HUB_CACHE={offline}" in msg and "offline" in msg and "local folder" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json") as e:
        M.resolve_model(tmp_path / "empty")
    one_line(e)
    with pytest.raises(ModelError, match="not a Hugging Face id") as e:
        M.resolve_model("no/such/folder", what="--judge")
    assert one_line(e).startswith("--judge no/such/folder")
    for path in ("./no_such_folder", "../no/such"):  # look like ORG/NAME, but are relative paths
        with pytest.raises(ModelError, match="no such folder, and not a Hugging Face id"):
            M.resolve_model(path)


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_custom_code_is_refused_never_run(tmp_path, where):
    d = tmp_path / "m"
    make_hf_model("llama", d)
    marker = tmp_path / "executed"
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import *\n")
    cfg = json.loads((d / where).read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
                       "AutoTokenizer": ["evil.EvilTokenizer", None]}
    (d / where).write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=f"{where}: has auto_map") as e:
        M.load_tokenizer(d)
    one_line(e)
    if where == "config.json":
        with pytest.raises(ModelError, match="auto_map"):
            Transformer.from_pretrained(d)
    assert not marker.exists()


def test_tokenizer_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        M.load_tokenizer(tmp_path / "nothing")
    (tmp_path / "e").mkdir()
    with pytest.raises(ModelError, match="no tokenizer files") as e:
        M.load_tokenizer(tmp_path / "e")
    one_line(e)
    (tmp_path / "e" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot load a tokenizer") as e:
        M.load_tokenizer(tmp_path / "e")
    one_line(e)


def edit_config(**change):
    def f(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(change)
        (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return f


def edit_weights(fn):
    def f(d):
        state = load_file(str(d / "model.safetensors"))
        fn(state)
        save_file(state, str(d / "model.safetensors"))
    return f


def truncate(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) - 1000])


BROKEN = {  # name: (how to break a good folder, the file the message names, what it says)
    "config not json": (lambda d: (d / "config.json").write_text("{'hidden_size': 64,"), "config.json",
                        "not valid JSON"),
    "config is a list": (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json", "JSON list"),
    "no hidden_size": (edit_config(hidden_size=None), "config.json", "hidden_size missing"),
    "no max_position_embeddings": (edit_config(max_position_embeddings=None), "config.json",
                                   "max_position_embeddings missing"),
    "string layers": (edit_config(num_hidden_layers="2"), "config.json", "num_hidden_layers missing or not"),
    "heads do not divide": (edit_config(num_key_value_heads=3), "config.json", "multiple of num_key_value_heads"),
    "wrong shape": (edit_weights(lambda s: s.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(100, 64)})),
                    "", "wrong shape.*layers.1.mlp.up_proj.weight is \\(100, 64\\), expected \\(128, 64\\)"),
    "missing weight": (edit_weights(lambda s: s.pop("model.norm.weight")), "", "lacks 1 tensors.*norm.weight"),
    "unexpected tensor": (edit_weights(lambda s: s.update({"vision.proj": torch.zeros(2)})), "model.safetensors",
                          "unexpected tensor 'vision.proj'"),
    "garbage safetensors": (lambda d: (d / "model.safetensors").write_bytes(os.urandom(4096)), "model.safetensors",
                            "not a readable safetensors file"),
    "truncated safetensors": (truncate, "model.safetensors", "not a readable safetensors file"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_folders_are_one_line(tmp_path, case):
    d = tmp_path / "m"
    make_hf_model("llama", d)
    breaks, file, says = BROKEN[case]
    breaks(d)
    with pytest.raises(ModelError, match=says) as e:
        Transformer.from_pretrained(d)
    assert str(d / file) in one_line(e)


@pytest.mark.parametrize("change", [dict(num_hidden_layers=10**9), dict(hidden_size=2**24, intermediate_size=2**26)])
def test_absurd_size_refused_before_allocating(tmp_path, monkeypatch, change):
    d = tmp_path / "m"
    make_hf_model("llama", d)
    edit_config(**change, head_dim=16)(d)

    def forbidden(*a, **k):
        raise AssertionError("allocated or read weights before the memory check")
    monkeypatch.setattr(M, "load_tensors", forbidden)
    monkeypatch.setattr(Transformer, "__init__", forbidden)
    with pytest.raises(ModelError, match="parameters .* need .* GiB in torch.float32 but cpu has .* GiB free") as e:
        Transformer.from_pretrained(d)
    assert str(d / "config.json") in one_line(e)


def test_count_params_matches_a_hand_count():
    a = ModelArgs(arch="llama", vocab_size=100, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4,
                  hidden_dim=32)
    # embed 100*16 + lm_head 100*16 + final norm 16 + 2 layers * (q 16*16 + k 16*8 + v 16*8 + o 16*16
    #   + gate/up/down 3*16*32 + 2 norms * 16) = 1600 + 1600 + 16 + 2 * 2336
    assert B.count_params(a) == 7888 == Transformer(a).num_params()
    est = B.memory_estimate(a, micro_batch=3, seq_len=10)  # bf16 autocast (act_bytes 2) over fp32 weights
    assert est["params"] == 7888 and est["weights"] == est["grads"] == 4 * 7888 and est["optimizer"] == 8 * 7888
    # per token per layer 16*16 + 4*4 + 2 * (2*16 + 2*8 + 4*32 + 5*16) = 784; head 2 * (100 + 16) + 8*16 = 360;
    # bf16 copies of the matmul weights (all but the embedding) 2 * (7888 - 1600); 3 * 10 = 30 tokens
    assert est["activations"] == 30 * (2 * 784 + 360) and est["weight_copies"] == 2 * 6288 and est["kv_cache"] == 0
    assert est["total"] == 16 * 7888 + 2 * 6288 + est["activations"]
    ck = B.memory_estimate(a, micro_batch=3, seq_len=10, grad_ckpt=True)
    assert ck["activations"] == 30 * (2 * 4 * 16 + 784 + 360)  # two block inputs + one block + head
    gen = B.memory_estimate(a, micro_batch=3, seq_len=10, train=False, param_bytes=2)  # bf16 weights, no cast
    assert gen["grads"] == gen["optimizer"] == gen["weight_copies"] == 0 and gen["weights"] == 2 * 7888
    # KV cache 30 tokens * 2 layers * (k, v) * 2 kv heads * 4 * 2 bytes; one layer 272 + 2 * (32+16+128+32) = 688
    assert gen["kv_cache"] == 30 * 2 * 2 * 2 * 4 * 2 and gen["activations"] == 30 * 688 + 3 * 100 * 4
    # published sizes: Mistral-7B-v0.1, Llama-3-8B, Qwen2.5-0.5B
    mistral = ModelArgs(arch="mistral", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                        head_dim=128, hidden_dim=14336)
    llama3 = ModelArgs(arch="llama", vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                       head_dim=128, hidden_dim=14336)
    qwen = ModelArgs(arch="qwen2", vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64,
                     hidden_dim=4864, qkv_bias=True, tie_embeddings=True)
    assert [B.count_params(x) for x in (mistral, llama3, qwen)] == [7_241_732_096, 8_030_261_248, 494_032_768]


@pytest.mark.parametrize("autocast", [False, True])
def test_activation_estimate_matches_saved_tensors(autocast):
    """The bytes autograd actually keeps for backward (counted through saved-tensor hooks, each storage once,
    parameters excluded) are within 2% of memory_estimate's activations."""
    a = ModelArgs(arch="qwen2", vocab_size=1000, dim=128, n_layers=3, n_heads=8, n_kv_heads=2, head_dim=16,
                  hidden_dim=384, qkv_bias=True, tie_embeddings=True)
    m = Transformer(a).train()
    params, kept = {p.untyped_storage().data_ptr() for p in m.parameters()}, {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    idx = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(0))
    sel = torch.ones_like(idx, dtype=torch.bool)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            m(idx, select=sel, targets=idx.flatten())
    except RuntimeError as e:
        pytest.skip(f"CPU bf16 autocast unsupported: {e}")
    est = B.memory_estimate(a, micro_batch=4, seq_len=64, act_bytes=2 if autocast else 4)
    est = est["activations"] + est["weight_copies"]
    assert abs(est / sum(kept.values()) - 1) < 0.02


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_count_params_matches_the_module(arch):
    a = ModelArgs.from_hf_config(hf_config(arch, 102, attention_bias=True, mlp_bias=True).to_dict())
    assert B.count_params(a) == Transformer(a).num_params()


def test_check_memory(monkeypatch):
    tiny = ModelArgs(arch="llama", vocab_size=100, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4,
                     hidden_dim=32)
    est = B.check_memory(tiny, "cpu", micro_batch=2, seq_len=16)  # the real free memory of this machine
    assert est["free"] > est["total"] > 0
    huge = ModelArgs(arch="llama", vocab_size=128256, dim=2**16, n_layers=4096, n_heads=512, n_kv_heads=8,
                     head_dim=128, hidden_dim=2**18)
    with pytest.raises(ModelError, match="GiB on cpu") as e:
        B.check_memory(huge, "cpu", micro_batch=8, seq_len=4096)
    one_line(e)
    # a free budget that fits the weights, grads and AdamW but not 16 pairs of activations
    a = ModelArgs(arch="qwen2", vocab_size=1000, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16,
                  hidden_dim=256, tie_embeddings=True, qkv_bias=True)
    kw = dict(micro_batch=16, seq_len=512, seqs_per_item=2)
    full, ck = B.memory_estimate(a, **kw), B.memory_estimate(a, **kw, grad_ckpt=True)
    fixed = full["weights"] + full["grads"] + full["optimizer"] + full["weight_copies"]
    per_pair = (full["total"] - fixed) / 16
    monkeypatch.setattr(B, "free_memory", lambda device: fixed + int(5.5 * per_pair))
    with pytest.raises(ModelError, match="lower --micro_batch to 5$") as e:
        B.check_memory(a, "cuda", **kw)
    assert ck["total"] > fixed + 5.5 * per_pair and one_line(e)
    monkeypatch.setattr(B, "free_memory", lambda device: ck["total"])
    with pytest.raises(ModelError, match=r"lower --micro_batch to \d+ or pass --grad_ckpt true$"):
        B.check_memory(a, "cuda", **kw)
    monkeypatch.setattr(B, "free_memory", lambda device: fixed // 2)
    with pytest.raises(ModelError, match="larger device"):
        B.check_memory(a, "cuda", **kw)


def test_generation_config_survives_a_round_trip(tmp_path):
    make_hf_model("qwen2", tmp_path / "src")
    gen = {"bos_token_id": 1, "eos_token_id": [4, 2], "pad_token_id": 0, "do_sample": True, "temperature": 0.7,
           "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05, "transformers_version": "4.37.0"}
    (tmp_path / "src" / "generation_config.json").write_text(json.dumps(gen, indent=2))
    m = Transformer.from_pretrained(tmp_path / "src")
    m.save_pretrained(tmp_path / "a")
    Transformer.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")  # a checkpoint of a checkpoint
    m.save_pretrained(tmp_path / "src")                                           # over its own source folder
    for d in ("a", "b", "src"):
        assert json.loads((tmp_path / d / "generation_config.json").read_text()) == gen
    (tmp_path / "src" / "generation_config.json").unlink()                       # no source file: built as before
    Transformer.from_pretrained(tmp_path / "src").save_pretrained(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "generation_config.json").read_text()) == dict(
        bos_token_id=1, eos_token_id=2, pad_token_id=0)


def test_bf16_autocast_forward_close_to_fp32(tmp_path):
    make_hf_model("llama", tmp_path / "m")
    m = Transformer.from_pretrained(tmp_path / "m")
    idx = torch.randint(5, m.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(idx)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = m(idx)
        except RuntimeError as e:
            pytest.skip(f"CPU bf16 autocast unsupported: {e}")
    # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.004): two layers measured 0.3-0.5% of the logit scale
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    assert got.dtype == torch.float32 and 0 < err < 2e-2  # > 0: the matmuls did run in bf16


def test_bf16_weights_forward_and_backward_on_cpu(tmp_path):
    make_hf_model("qwen3", tmp_path / "m")
    m = Transformer.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).train()
    idx = torch.randint(5, m.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    sel = torch.zeros_like(idx, dtype=torch.bool)
    sel[:, 8:-1] = True
    try:
        logp = m(idx, select=sel, targets=idx[:, 1:][sel[:, :-1]])
    except RuntimeError as e:
        pytest.skip(f"CPU bf16 matmul unsupported: {e}")
    logp.sum().backward()
    g = m.layers[0].self_attn.q_proj.weight.grad
    assert logp.shape == (14,) and torch.isfinite(logp).all() and (logp < 0).all()
    assert g.dtype == torch.bfloat16 and torch.isfinite(g).all() and g.abs().sum() > 0


def test_model_io_never_imports_model_and_model_reexports_nothing():
    """No import circle: model_io.py and budget.py import without model.py, model.py does not
    re-export their folder/tokenizer/memory helpers, and model_io does not keep budget's
    (importers take them from where they live)."""
    for name in ("check_memory", "load_tokenizer", "resolve_model"):
        assert not hasattr(model, name)
    for name in ("check_memory", "check_fits", "memory_estimate", "pick_threads", "count_params"):
        assert not hasattr(M, name)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import sys; from dnolib import model_io, budget; print('dnolib.model' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_pick_threads_grows_with_the_model_within_the_cores(monkeypatch):
    from dnolib.budget import PARAMS_PER_THREAD, pick_threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert pick_threads("auto", 140_000) == 1                   # the demo's 0.14M-parameter Llama
    assert pick_threads("auto", 3 * PARAMS_PER_THREAD) == 3
    assert pick_threads("auto", 7_000_000_000) == 8            # never above the cores this process may use
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")                 # torchrun: the ranks of one machine share them
    assert pick_threads("auto", 7_000_000_000) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")                  # an explicit OMP_NUM_THREADS caps auto
    assert pick_threads("AUTO", 7_000_000_000) == 3
    assert pick_threads("6", 140_000) == 6                      # a number is taken as given
    for bad in ("0", "-1", "two", "1.5", ""):
        with pytest.raises(ValueError, match="--threads must be auto or an integer >= 1"):
            pick_threads(bad, 1)

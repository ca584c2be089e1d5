"""lora.py: merged checkpoint == base + scale B A, loads in transformers with the same logits; a LoRA run trains;
the memory estimate counts no gradients or AdamW state for frozen weights."""
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import dno
from dnolib import lora
from dnolib.model import ModelArgs, Transformer
from dnolib.budget import count_lora_params, memory_estimate
from tiny import make_hf_model

torch.set_num_threads(1)


def test_merged_checkpoint_is_base_plus_scaled_BA_and_loads_in_transformers(tmp_path):
    make_hf_model("qwen2", tmp_path / "m")  # q/k/v bias and tied embeddings
    model = Transformer.from_pretrained(tmp_path / "m")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    params = lora.add_lora(model, rank=4, alpha=8)
    assert len(params) == 2 * 7 * model.args.n_layers
    assert sum(p.numel() for p in params) == count_lora_params(model.args, 4)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    idx = torch.randint(5, model.args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(idx)
        for p in params:  # B = 0 at the start: adapters change nothing; then give every B a value
            p.add_(0.05 * torch.randn_like(p))
        adapted = model(idx)
    assert (adapted - plain).abs().max() > 1e-2
    model.save_pretrained(tmp_path / "merged", state_dict=lora.merged_state_dict(model))
    saved = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert not any("lora" in k for k in saved)
    q = model.layers[1].self_attn.q_proj
    want = base["layers.1.self_attn.q_proj.weight"] + 2.0 * q.lora_B @ q.lora_A  # scale = alpha / rank = 2
    assert torch.allclose(saved["model.layers.1.self_attn.q_proj.weight"], want, atol=1e-6)
    assert torch.equal(saved["model.layers.1.self_attn.q_proj.bias"], base["layers.1.self_attn.q_proj.bias"])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (hf(idx).logits - adapted).abs().max().item() < 1e-4
        again = Transformer.from_pretrained(tmp_path / "merged")
        assert (again(idx) - adapted).abs().max().item() < 1e-4


def test_a_lora_run_trains_pairs():
    """DNO's loss on fixed pairs, reference = the model before training: loss falls, the margin grows, and
    only the adapters moved."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                                  hidden_dim=64, max_seq_len=64))
    g = torch.Generator().manual_seed(1)
    toks = lambda n: torch.randint(3, 64, (n,), generator=g).tolist()  # noqa: E731
    pairs = [{"prompt_tokens": toks(5), "chosen_tokens": toks(6), "rejected_tokens": toks(7)} for _ in range(8)]
    with torch.no_grad():
        ref_c, ref_r, _ = dno.pair_logps(model, pairs, "cpu")
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(lora.add_lora(model, rank=4, alpha=8), lr=1e-2)
    log = []
    for _ in range(30):
        c, r, _ = dno.pair_logps(model, pairs, "cpu")
        losses, st = dno.dno_loss(c, r, ref_c, ref_r, target=1.0, eta=0.1)
        losses.mean().backward()
        opt.step()
        opt.zero_grad()
        log.append((losses.mean().item(), st["margin"].item()))
    assert abs(log[0][0] - 0.6931) < 1e-3 and abs(log[0][1]) < 1e-5  # fresh adapters: pi == pi_t
    assert log[-1][0] < 0.5 and log[-1][1] > 0.5
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen[k]), k


def test_memory_estimate_knows_lora():
    args = ModelArgs(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                     hidden_dim=14336)
    kw = dict(micro_batch=1, seq_len=2048, seqs_per_item=2, grad_ckpt=True)
    full, lo = memory_estimate(args, **kw), memory_estimate(args, lora_rank=16, **kw)
    n = count_lora_params(args, 16)
    assert n == 16 * 32 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert lo["grads"] == 4 * n and lo["optimizer"] == 8 * n and lo["weights"] == full["weights"] + 4 * n
    assert lo["total"] < 0.4 * full["total"]


def test_adapters_come_from_their_own_seed_not_the_global_rng():
    """FSDP2 shards each rank's own copy (no broadcast from rank 0), so every torchrun rank, and a resumed run,
    must draw the same A: add_lora's seed decides it, whatever the global RNG did before."""
    args = ModelArgs(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64)
    adapters = []
    for global_seed, seed in ((1, 0), (2, 0), (1, 5)):
        torch.manual_seed(global_seed)
        model = Transformer(args)
        lora.add_lora(model, rank=4, alpha=8, seed=seed)
        adapters.append(model.layers[0].mlp.up_proj.lora_A.detach().clone())
    assert torch.equal(adapters[0], adapters[1]) and not torch.equal(adapters[0], adapters[2])

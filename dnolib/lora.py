"""LoRA from scratch: low-rank adapters on the attention and MLP projections, merged into the
weights on save.

    python lora.py                                    # CPU demo: adapters, a few steps, merged == adapted
    from dnolib.lora import add_lora, merged_state_dict
    add_lora(model, rank=16, alpha=32)                # every weight frozen; q/k/v/o, gate/up/down get A, B
    model.save_pretrained(d, state_dict=merged_state_dict(model))   # a plain Hugging Face folder again

Each adapted projection computes y = x W^T + b + (alpha / r) (x A^T) B^T with W frozen, A (r, in)
random and B (out, r) zero, so a fresh adapter changes nothing (Hu et al. 2021). Only A and B train:
no gradients and no AdamW state for the frozen weights (budget.memory_estimate(lora_rank=r) counts
it). The reference log-probs are precomputed from pi_t without adapters (train.py's reference
stage), so they are unchanged. Saving merges W + (alpha / r) B A and drops A, B: every iterate stays
a standard checkpoint that transformers and sample.py load as is, and the next iteration starts
fresh adapters on it. Parameter names are kept (q_proj.weight, ...; the adapters add q_proj.lora_A /
lora_B), so FSDP2 shards the adapted blocks like the others; A is drawn from add_lora's own seed,
so every rank shards the same values (tests/test_train.py: 2 ranks on gloo == one process).

Notes (the paper trains all weights of Mistral-7B):
 1. Low-rank updates only, when --lora_rank > 0; no dropout on the adapter input.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    """An nn.Linear (its weight and bias, shared, frozen) plus a trainable rank-r update (alpha / r)
    B A."""

    def __init__(self, base: nn.Linear, rank, alpha, generator=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        # the same Parameters: names and sharding unchanged
        self.weight, self.bias = base.weight, base.bias
        w = base.weight
        A = torch.empty(rank, self.in_features)                # (r, in), drawn on the CPU
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)  # as nn.Linear's weight
        self.lora_A = nn.Parameter(A.to(w.device, w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype,
                                               device=w.device))
        self.scale = alpha / rank

    def forward(self, x):  # x (..., in) -> (..., out)
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A),
                                                              self.lora_B) * self.scale


def add_lora(model, rank, alpha, seed=0):
    """Freeze every parameter of model; replace its TARGETS projections by LoRALinear. -> the
    trainable ones. The A matrices come from their own generator (seed), not the global one: every
    torchrun rank draws the same A before FSDP2 shards it (FSDP2 does not broadcast rank 0's
    values), and a resumed run draws what an uninterrupted one did."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for parent in list(model.modules()):
        for name in TARGETS:
            child = getattr(parent, name, None)
            if isinstance(child, nn.Linear) and not isinstance(child, LoRALinear):
                setattr(parent, name, LoRALinear(child, rank, alpha, g))
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def merged_state_dict(model, state=None):
    """model's state dict (or `state`, the same names gathered in full, e.g. under FSDP2) with every
    adapter merged, W + scale B A computed in float32 and cast back, and lora_A / lora_B dropped."""
    state = dict(model.state_dict() if state is None else state)
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            A, B = state.pop(f"{name}.lora_A"), state.pop(f"{name}.lora_B")
            w = state[f"{name}.weight"]
            state[f"{name}.weight"] = (w.float() + m.scale * (B.float() @ A.float())).to(w.dtype)
    return state


if __name__ == "__main__":
    from dnolib.model import ModelArgs, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                                  hidden_dim=128, max_seq_len=64))
    n_all = model.num_params()
    params = add_lora(model, rank=4, alpha=8)
    opt = torch.optim.AdamW(params, lr=1e-2)
    idx = torch.randint(0, 128, (4, 16))
    for step in range(20):  # next-token loss on one batch: only the adapters move
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    plain = Transformer(model.args)
    plain.load_state_dict(merged_state_dict(model))
    with torch.no_grad():
        diff = (plain(idx) - model(idx)).abs().max().item()
    print(f"{sum(p.numel() for p in params):,} trainable of {n_all:,} parameters; loss {loss.item():.3f} "
          f"after 20 steps; merged vs adapted logits max |diff| {diff:.1e}")

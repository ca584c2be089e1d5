"""A from-scratch Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) with Hugging Face checkpoint I/O.

    python model.py                                   # CPU demo: tiny random model, save -> load, memory estimate
    from model import Transformer, resolve_model, load_tokenizer, check_memory
    path = resolve_model("Qwen/Qwen2.5-0.5B-Instruct")  # a local folder as is, or a hub id -> its cached snapshot
    tok = load_tokenizer(path)                        # AutoTokenizer, trust_remote_code=False, one-line errors
    m = Transformer.from_pretrained(path, dtype=torch.bfloat16, device="cuda")
    logits = m(idx)                                   # (B, T) token ids -> (B, T, V) float32 logits
    logp = m(idx, select=sel, targets=tgt)            # training: log p(tgt) (N,) at the N positions where sel (B, T)
    m.save_pretrained("out/", tokenizer=tok)          # transformers.AutoModelForCausalLM loads this folder
    check_memory(m.args, "cuda", micro_batch=8, seq_len=2048, seqs_per_item=2)  # ModelError if a step cannot fit

Covers what transformers saves for LlamaForCausalLM (grouped-query attention, rope_theta, "llama3" and "linear"
rope scaling, optional attention/mlp bias), MistralForCausalLM (sliding window), Qwen2ForCausalLM (q/k/v bias,
tied embeddings) and Qwen3ForCausalLM (RMSNorm on q and k per head). Checkpoints: safetensors only (one file or a
sharded index), never pickle. Our parameter names are transformers' names without the "model." prefix, so the
whole checkpoint mapping is the `HF_PREFIX` table below.

KV cache (used by sample.py): `setup_cache(N, S)` preallocates (N, H_kv, S, D) keys/values per layer. A batch of
prompts is LEFT-padded to a common length T0 so every row writes cache slot T0 + t at decode step t; each row keeps
its own rope position (number of real tokens so far) and a (N, S) key-validity mask hides its padding slots.
`prefill` runs B prompts once and writes each prompt's keys into N // B consecutive cache rows (its K samples).

User mistakes are one-line `ModelError`s (a ValueError) naming the file: config.json that is not JSON, not an
object, lacks a required key; weights garbage, truncated, mis-shaped or missing; a config whose weights alone
exceed the device's free memory (refused from a parameter count, before anything is allocated); a hub id that is
neither cached nor downloadable. Nothing here runs code shipped with a model: a config.json or
tokenizer_config.json with "auto_map" is refused, and transformers is always called with trust_remote_code=False.
save_pretrained copies the source folder's generation_config.json (an Instruct model's eos list, top_p, top_k).

Departures (this file is infrastructure; the paper's model is Orca-2.5 = Mistral-7B):
 1. Rope types other than default/llama3/linear (yarn, dynamic, longrope) and per-layer sliding windows
    (Qwen use_sliding_window) are rejected with a ModelError rather than approximated.
 2. Padded query positions attend to themselves (finite garbage instead of NaN); their outputs are never used.
"""
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
         "Qwen3ForCausalLM": "qwen3"}
# our parameter name prefix -> transformers' name prefix (the entire checkpoint mapping)
HF_PREFIX = {"embed_tokens.": "model.embed_tokens.", "layers.": "model.layers.", "norm.": "model.norm.",
             "lm_head.": "lm_head."}
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)  # old checkpoints saved this buffer; we recompute it
REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "max_position_embeddings")


class ModelError(ValueError):
    """A user mistake in a model folder, a model id or a memory budget; the message is one line naming the file."""


@dataclass
class ModelArgs:
    arch: str = "llama"            # one of ARCHS.values()
    vocab_size: int = 32000
    dim: int = 4096                # hidden_size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8            # grouped-query attention: n_heads // n_kv_heads queries share a key/value head
    head_dim: int = 128
    hidden_dim: int = 14336        # intermediate_size of the SwiGLU MLP
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # {} or transformers' rope dict (rope_type llama3/linear)
    max_seq_len: int = 8192        # max_position_embeddings: the context the sampler enforces
    qkv_bias: bool = False         # Qwen2: True
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False          # Qwen3: RMSNorm over head_dim on q and k before rope
    tie_embeddings: bool = False   # lm_head.weight is embed_tokens.weight
    sliding_window: int = 0        # Mistral v0.1: a key is visible if q_pos - k_pos < sliding_window; 0 = off
    bos_token_id: int = None
    eos_token_id: int = None       # int or list of ints, as in config.json
    pad_token_id: int = None

    @classmethod
    def from_hf_config(cls, cfg: dict, source="config.json") -> "ModelArgs":
        """transformers' config.json dict -> ModelArgs; ModelError naming `source` when it cannot describe a model."""
        if not isinstance(cfg, dict):
            raise ModelError(f"{source}: expected a JSON object, got a JSON {type(cfg).__name__}")
        names = cfg.get("architectures") or []
        arch = ARCHS.get(names[0]) if isinstance(names, list) and names else cfg.get("model_type")
        if arch not in ARCHS.values():
            raise ModelError(f"{source}: unsupported architecture {names or cfg.get('model_type')!r}; "
                             f"supported: {', '.join(ARCHS)}")
        bad = [k for k in REQUIRED_HF_KEYS if not isinstance(cfg.get(k), int) or cfg[k] < 1]
        if bad:
            raise ModelError(f"{source}: {', '.join(bad)} missing or not a positive integer")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelError(f"{source}: unsupported hidden_act {cfg['hidden_act']!r} (only silu)")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})  # transformers v5 | v4 layout
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "llama3", "linear"):
            raise ModelError(f"{source}: unsupported rope_type {kind!r}; supported: default, llama3, linear")
        if arch in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
            raise ModelError(f"{source}: Qwen use_sliding_window=true is not supported")
        n_heads, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        if n_heads % n_kv or not (cfg.get("head_dim") or cfg["hidden_size"] % n_heads == 0):
            raise ModelError(f"{source}: num_attention_heads={n_heads} must be a multiple of num_key_value_heads="
                             f"{n_kv} and divide hidden_size={cfg['hidden_size']} (or give head_dim)")
        bias = bool(cfg.get("attention_bias", False))
        return cls(arch=arch, vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                   n_heads=n_heads, n_kv_heads=n_kv,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
                   hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta,
                   rope_scaling={} if kind == "default" else rope,
                   max_seq_len=cfg["max_position_embeddings"],
                   qkv_bias=True if arch == "qwen2" else bias, o_bias=False if arch == "qwen2" else bias,
                   mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=arch == "qwen3",
                   tie_embeddings=bool(cfg.get("tie_word_embeddings", arch in ("qwen2", "qwen3"))),
                   sliding_window=(cfg.get("sliding_window") or 0) if arch == "mistral" else 0,
                   bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
                   pad_token_id=cfg.get("pad_token_id"))

    def to_hf_config(self) -> dict:
        a = self
        cfg = dict(architectures=[{v: k for k, v in ARCHS.items()}[a.arch]], model_type=a.arch,
                   vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim,
                   num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                   head_dim=a.head_dim, hidden_act="silu", max_position_embeddings=a.max_seq_len,
                   rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, rope_scaling=a.rope_scaling or None,
                   tie_word_embeddings=a.tie_embeddings, bos_token_id=a.bos_token_id,
                   eos_token_id=a.eos_token_id, pad_token_id=a.pad_token_id)
        if a.arch in ("llama", "qwen3"):
            cfg["attention_bias"] = a.qkv_bias
        if a.arch == "llama":
            cfg["mlp_bias"] = a.mlp_bias
        if a.arch == "mistral":
            cfg["sliding_window"] = a.sliding_window or None
        if a.arch in ("qwen2", "qwen3"):
            cfg["use_sliding_window"] = False
        return cfg


def rope_inv_freq(a: ModelArgs) -> torch.Tensor:
    """(head_dim / 2,) float32 rotary frequencies, with the llama3 / linear context-extension rescaling."""
    inv = 1.0 / a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.float32, device="cpu") / a.head_dim)
    r = a.rope_scaling
    if r.get("rope_type", r.get("type")) == "linear":
        return inv / r["factor"]
    if r.get("rope_type", r.get("type")) == "llama3":  # long wavelengths slowed by `factor`, short kept, blend between
        old, lo, hi = r["original_max_position_embeddings"], r["low_freq_factor"], r["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)
        scaled = torch.where(wavelen > old / lo, inv / r["factor"], inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        return torch.where(mid, (1 - smooth) * inv / r["factor"] + smooth * inv, scaled)
    return inv


def rotate(x, cos, sin):  # x (B, H, T, D); cos/sin (B, 1, T, D); transformers' half-split rotation layout
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalise in float32, scale in the model dtype (as transformers does)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)


class KVCache(nn.Module):
    def __init__(self, n, n_kv_heads, seq_len, head_dim, dtype, device):
        super().__init__()
        shape = (n, n_kv_heads, seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(self, slots, k, v):  # slots (T,); k/v (B, H_kv, T, D) with B dividing N: row b -> rows b*K..b*K+K-1
        rep = self.k.shape[0] // k.shape[0]
        if rep > 1:
            k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = a.n_heads, a.n_kv_heads, a.head_dim
        self.q_proj = nn.Linear(a.dim, a.n_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=a.o_bias)
        if a.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(a.head_dim, a.norm_eps), RMSNorm(a.head_dim, a.norm_eps)
        self.cache = None

    def forward(self, x, cos, sin, mask, slots=None, kv_len=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, H_kv, T, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin)  # (B, H, T, D)
        if slots is not None:       # write this chunk into the cache (prefill: each prompt into its K rows)
            self.cache.write(slots, k, v)
            if kv_len is not None:  # decode: attend over cache slots [0, kv_len); prefill attends its own k/v
                k, v = self.cache.k[:, :, :kv_len], self.cache.v[:, :, :kv_len]
        if mask is None:            # training / unpadded: causal, fused kernel, GQA without copying k/v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        else:                       # fold the G query heads sharing a kv head into the time axis: no k/v repeat
            G = self.n_heads // self.n_kv
            qg = q.reshape(B, self.n_kv, G * T, self.hd)  # head h = kv * G + g
            y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask.repeat(1, 1, G, 1) if T > 1 else mask)
            y = y.reshape(B, self.n_heads, T, self.hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.dim, a.hidden_dim, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.dim, a.hidden_dim, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.hidden_dim, a.dim, bias=a.mlp_bias)

    def forward(self, x):  # SwiGLU
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(a.dim, a.norm_eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.dim, a.norm_eps)
        self.mlp = MLP(a)

    def forward(self, x, cos, sin, mask, slots=None, kv_len=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, slots, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


def make_mask(key_valid, q_slots, window=0):
    """(B, 1, T, S) bool attention mask: key s visible from query slot q if valid, s <= q (causal) and inside the
    sliding window; every query also sees itself so fully padded rows stay finite. key_valid (B, S), q_slots (T,)."""
    k_slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    m = key_valid[:, None, None, :] & (k_slots <= q_slots[:, None])
    if window:
        m = m & (q_slots[:, None] - k_slots < window)
    return m | (k_slots == q_slots[:, None])


class HeadLogp(torch.autograd.Function):
    """log softmax(h W^T)[target] per row with a single (N, V) buffer. Forward: logits -> exp(logits - rowmax) in
    place, kept for backward; backward scales it in place into the logits' gradient, g (onehot - softmax), then
    two matmuls. (Autograd through lm_head, logsumexp and gather would hold two or three (N, V) tensors and make
    several more passes over them.) One backward only. Under autocast the matmuls run in the autocast dtype and
    the exp/sums in float32."""
    @staticmethod
    def forward(ctx, h, w, targets):  # h (N, C), w (V, C), targets (N,) long
        dt = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        acc = torch.promote_types(dt, torch.float32)                       # softmax math in >= float32
        hc, wc = h.to(dt), w.to(dt)
        logits = hc @ wc.t()                                               # (N, V)
        zt = logits.gather(-1, targets[:, None]).squeeze(-1).to(acc)      # (N,) target logit
        m = logits.amax(-1, keepdim=True).to(acc)                          # (N, 1)
        s = torch.empty(len(h), dtype=acc, device=h.device)                # (N,) sum exp(z - m)
        for r in range(0, len(h), 1024):                                   # row chunks bound the temporaries
            e = logits[r:r + 1024].to(acc).sub_(m[r:r + 1024]).exp_()     # in place when float32
            s[r:r + 1024] = e.sum(-1)
            logits[r:r + 1024].copy_(e)
        ctx.save_for_backward(hc, wc, targets, logits, s)
        ctx.dtypes = h.dtype, w.dtype
        return zt - m.squeeze(-1) - s.log()                                # (N,) z_t - logsumexp(z)

    @staticmethod
    def backward(ctx, g):  # g (N,) d loss / d logp
        hc, wc, targets, e, s = ctx.saved_tensors
        scale = -g.to(s.dtype) / s                                         # (N,) softmax = e / s
        for r in range(0, len(e), 1024):
            e[r:r + 1024].copy_(e[r:r + 1024].to(s.dtype).mul_(scale[r:r + 1024, None]))   # -g softmax
        e.scatter_add_(1, targets[:, None], g[:, None].to(e.dtype))        # + g onehot: d loss / d logits
        gh = (e @ wc).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None    # (N, C)
        gw = (e.t() @ hc).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None  # (V, C)
        return gh, gw, None


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args, self.config = args, args.to_hf_config()  # config: the HF config.json dict save_pretrained writes
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))  # FSDP2 shards each Block
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.inv_freq = rope_inv_freq(args)  # plain attribute, not a buffer: stays float32 when the model is cast
        self.register_buffer("key_valid", None, persistent=False)  # (N, S) bool once setup_cache is called
        self.register_buffer("next_pos", None, persistent=False)   # (N,) long: each row's next rope position

    def _rope(self, pos, dtype):  # pos (B, T) -> cos, sin (B, 1, T, D), computed in float32 like transformers
        if self.inv_freq.device != pos.device:
            self.inv_freq = self.inv_freq.to(pos.device)
        f = pos[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((f, f), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _trunk(self, idx, pos, mask, slots=None, kv_len=None, last_only=False, select=None, targets=None):
        x = self.embed_tokens(idx)  # (B, T, C)
        cos, sin = self._rope(pos, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, slots, kv_len)
        if last_only:
            x = x[:, -1:]
        if select is not None:      # only the rows that are scored go through the norm and the vocab projection
            x = x[select]           # (N, C)
            if targets is not None:
                return HeadLogp.apply(self.norm(x), self.lm_head.weight, targets)  # (N,) log p(target)
        return self.lm_head(self.norm(x)).float()  # (B, T, V), or (N, V) with select

    def forward(self, idx, attention_mask=None, select=None, targets=None):
        """idx (B, T) -> logits (B, T, V) float32, no cache. attention_mask (B, T) {0,1} for LEFT-padded batches;
        training uses right padding and passes none (fused causal attention).
        select (B, T) bool: return only the selected positions' logits (N, V), N = select.sum(), row-major order
        (training scores response tokens only; the vocab projection is a large share of a small model's FLOPs).
        targets (N,) long, with select: return log p(targets) (N,) float32 through HeadLogp (no (N, V) grad graph)."""
        B, T = idx.shape
        q_slots = torch.arange(T, device=idx.device)
        if attention_mask is None:
            pos = q_slots.expand(B, T)
            w = self.args.sliding_window
            mask = make_mask(torch.ones_like(idx, dtype=torch.bool), q_slots, w) if w and T > w else None
        else:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # per-row positions under left padding
            mask = make_mask(attention_mask.bool(), q_slots, self.args.sliding_window)
        return self._trunk(idx, pos, mask, select=select, targets=targets)

    # ---- KV cache (sample.py) ----
    def setup_cache(self, batch_size, max_seq_len, dtype=None, device=None):
        """Preallocate a static (N, H_kv, S, D) cache per layer; same-shaped caches are reused (torch.compile)."""
        w = self.embed_tokens.weight
        dtype, device = dtype or w.dtype, torch.device(device or w.device)
        shape = (batch_size, self.args.n_kv_heads, max_seq_len, self.args.head_dim)
        for layer in self.layers:
            c = layer.self_attn.cache
            if c is None or c.k.shape != shape or c.k.dtype != dtype or c.k.device != device:
                layer.self_attn.cache = KVCache(batch_size, self.args.n_kv_heads, max_seq_len, self.args.head_dim,
                                                dtype, device)
        kv = self.key_valid
        if kv is None or kv.shape != (batch_size, max_seq_len) or kv.device != device:
            self.key_valid = torch.zeros(batch_size, max_seq_len, dtype=torch.bool, device=device)  # buffers:
            self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # CUDA graphs may mutate them

    def clear_cache(self):
        """Free the KV cache (e.g. before training the same module)."""
        for layer in self.layers:
            layer.self_attn.cache = None
        self.key_valid = self.next_pos = None

    @torch.no_grad()
    def prefill(self, idx, attention_mask):
        """Run B left-padded prompts (B, T0) once into cache slots [0, T0); prompt b fills cache rows
        b*K .. b*K+K-1 (K = N // B, its samples). Returns last-position logits (B, V)."""
        B, T0 = idx.shape
        rep = self.key_valid.shape[0] // B
        am = attention_mask.bool()
        slots = torch.arange(T0, device=idx.device)
        self.key_valid.zero_()
        self.key_valid[:, :T0] = am.repeat_interleave(rep, 0)
        self.next_pos.copy_(am.sum(-1).repeat_interleave(rep))  # next rope position = number of real tokens
        pos = (am.long().cumsum(-1) - 1).clamp(min=0)
        mask = make_mask(am, slots, self.args.sliding_window)
        return self._trunk(idx, pos, mask, slots, None, last_only=True)[:, -1]

    @torch.no_grad()
    def decode(self, tok, slot, kv_len):
        """One step for all N rows: tok (N,) long, slot (1,) long tensor = the cache slot written (same for every
        row under left padding), kv_len: slots attended (slot + 1 eager; the full cache length when compiled
        so shapes stay static). Returns logits (N, V)."""
        self.key_valid.index_fill_(1, slot, True)
        mask = make_mask(self.key_valid[:, :kv_len], slot, self.args.sliding_window)  # (N, 1, 1, kv_len)
        logits = self._trunk(tok[:, None], self.next_pos[:, None], mask, slot, kv_len)[:, -1]
        self.next_pos.add_(1)
        return logits

    # ---- Hugging Face checkpoint I/O ----
    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Transformer":
        """Load a local Hugging Face folder (see resolve_model for hub ids). User mistakes (bad config.json, a
        model too large for `device`, garbage / truncated / mis-shaped / missing tensors) raise a one-line error."""
        path = Path(path)
        cfg = read_config(path)
        args = ModelArgs.from_hf_config(cfg, source=path / "config.json")
        check_fits(args, device, dtype, path / "config.json")  # before reading or allocating anything
        to_ours = {hf: ours for ours, hf in HF_PREFIX.items()}
        state = {}
        for file in weight_files(path):
            for name, t in load_tensors(file, device, dtype, args.tie_embeddings).items():
                prefix = next((p for p in to_ours if name.startswith(p)), None)
                if prefix is None:
                    raise ModelError(f"{file}: unexpected tensor {name!r}")
                state[to_ours[prefix] + name[len(prefix):]] = t
        if args.tie_embeddings and "embed_tokens.weight" in state:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        with torch.device("meta"):
            model = cls(args)
        want = model.state_dict()
        missing = sorted(set(want) - set(state))
        if missing:
            raise ModelError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
        bad = [(k, tuple(state[k].shape), tuple(want[k].shape)) for k in want if state[k].shape != want[k].shape]
        if bad:
            raise ModelError(f"{path}: {len(bad)} tensors have the wrong shape for config.json, e.g. {bad[0][0]} "
                             f"is {bad[0][1]}, expected {bad[0][2]}")
        model.load_state_dict(state, strict=True, assign=True)
        if args.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.config = cfg  # keep every field of the original config.json for save_pretrained
        model.source = path  # its generation_config.json (eos list, top_p, ...) is copied by save_pretrained
        return model.eval()

    def save_pretrained(self, path, tokenizer=None, state_dict=None):
        """Write config.json, generation_config.json, model.safetensors (+ tokenizer files). state_dict: a full
        (gathered) state dict when the module itself is sharded, e.g. under FSDP2. generation_config.json is the
        source folder's, unchanged, when the model was loaded from one that has it; else built from config.json."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        out = {}
        for name, t in state.items():
            if self.args.tie_embeddings and name == "lm_head.weight":
                continue  # tied: transformers re-ties it from embed_tokens
            prefix = next(p for p in HF_PREFIX if name.startswith(p))
            out[HF_PREFIX[prefix] + name[len(prefix):]] = t.detach().contiguous().cpu()
        dtype = next(iter(out.values())).dtype
        cfg = dict(self.config, dtype=str(dtype).removeprefix("torch."), tie_word_embeddings=self.args.tie_embeddings)
        cfg.pop("torch_dtype", None)
        (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        src = getattr(self, "source", None)
        gen = src / "generation_config.json" if src is not None else None
        if gen is not None and gen.is_file():
            if gen.resolve() != (path / "generation_config.json").resolve():
                shutil.copyfile(gen, path / "generation_config.json")
        else:
            gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
            (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


# ---- model folders, hub ids, tokenizers: one-line errors, never custom code ----
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]  # config, weights, tokenizer; no .py


def one_line(e) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def read_json(file):
    try:
        return json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{file}: not valid JSON ({one_line(e)})") from None


def refuse_custom_code(cfg, file):
    """A folder whose config names its own Python classes (auto_map) is refused: we never run code from a model."""
    if isinstance(cfg, dict) and "auto_map" in cfg:
        raise ModelError(f"{file}: has auto_map (custom model code); refused, this repo never runs code shipped "
                         "with a model (trust_remote_code=False)")


def read_config(path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found (expected a Hugging Face model folder)")
    cfg = read_json(file)
    refuse_custom_code(cfg, file)
    return cfg


def weight_files(path) -> list:
    """The safetensors files of a model folder: model.safetensors, or the shards named by its index."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        wm = read_json(index)
        if not isinstance(wm, dict) or not isinstance(wm.get("weight_map"), dict):
            raise ModelError(f"{index}: expected an object with a weight_map")
        files = [path / f for f in sorted(set(wm["weight_map"].values()))]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path} "
                                "(only safetensors checkpoints are supported)")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint shard {f} not found")
    return files


def load_tensors(file, device, dtype, tied) -> dict:
    """{transformers name: tensor} of one safetensors file, cast to dtype; tied: skip a stored lm_head.weight."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            return {n: f.get_tensor(n).to(dtype) for n in f.keys()
                    if not n.endswith(IGNORED_HF_SUFFIXES) and not (tied and n == "lm_head.weight")}
    except (SafetensorError, OSError) as e:  # garbage, truncated or unreadable
        raise ModelError(f"{file}: not a readable safetensors file ({one_line(e)})") from None


def hub_cache() -> str:
    """The hub cache folder the way huggingface_hub finds it, read from the environment now (not at import)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.expanduser(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
                              or os.path.join(home, "hub"))


def resolve_model(name_or_path, what="--model") -> str:
    """A local model folder, or a hub id ORG/NAME -> its snapshot folder in the hub cache (downloading config,
    safetensors and tokenizer files when online; never .py files). `what` names the flag in error messages."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"{what} {name_or_path}: folder has no config.json (not a Hugging Face model folder)")
        return str(p)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path)):
        raise ModelError(f"{what} {name_or_path}: no such folder, and not a Hugging Face id ORG/NAME")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    cache = hub_cache()
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    try:
        folder = snapshot_download(str(name_or_path), cache_dir=cache, allow_patterns=HUB_FILES,
                                   local_files_only=offline)
    except LocalEntryNotFoundError:
        raise ModelError(f"{what} {name_or_path}: not in the Hugging Face cache (HF_HUB_CACHE={cache}) and "
                         f"{'offline (HF_HUB_OFFLINE=1)' if offline else 'the hub is unreachable'}; download it once "
                         "online, or pass a local folder") from None
    except (HfHubHTTPError, OSError, ValueError) as e:  # unknown or gated repo, bad revision, disk full
        raise ModelError(f"{what} {name_or_path}: {type(e).__name__} from the hub ({one_line(e)})") from None
    if not (Path(folder) / "config.json").is_file():
        raise ModelError(f"{what} {name_or_path}: the hub snapshot {folder} has no config.json")
    return folder


def load_tokenizer(path):
    """AutoTokenizer of a local folder (trust_remote_code=False; an auto_map is refused) with one-line errors."""
    from transformers import AutoTokenizer
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} not found")
    for name in ("config.json", "tokenizer_config.json"):
        if (path / name).is_file():
            refuse_custom_code(read_json(path / name), path / name)
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelError(f"{path}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # transformers' messages run 3-5 lines
        raise ModelError(f"{path}: cannot load a tokenizer ({one_line(e)})") from None


# ---- memory: estimate before anything is allocated ----
def count_params(args: ModelArgs) -> int:
    """Parameters of Transformer(args), counted by hand from the shapes (no allocation)."""
    C, F, H, K, D = args.dim, args.hidden_dim, args.n_heads, args.n_kv_heads, args.head_dim
    attn = 2 * C * H * D + 2 * C * K * D                                  # q, o (C x H D); k, v (C x K D)
    attn += (H * D + 2 * K * D) * args.qkv_bias + C * args.o_bias + 2 * D * args.qk_norm
    mlp = 3 * C * F + (2 * F + C) * args.mlp_bias                         # gate, up, down
    layer = attn + mlp + 2 * C                                            # + two RMSNorms
    return args.vocab_size * C * (1 if args.tie_embeddings else 2) + C + args.n_layers * layer


def free_memory(device):
    """Bytes free on device now: CUDA mem_get_info, CPU /proc/meminfo MemAvailable; None when unknown (then
    nothing is checked). A container's cgroup limit is not read: its page cache would make it look full."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] if torch.cuda.is_available() else None
    if device.type != "cpu":  # mps, meta: unknown
        return None
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):  # not Linux
        return None


def check_fits(args, device, dtype, source):
    """Refuse a config whose weights alone exceed the free memory, before the loader allocates (or loops) at all."""
    n, free = count_params(args), free_memory(device)
    if free is not None and n * dtype.itemsize > free:
        raise ModelError(f"{source}: {n:,} parameters (num_hidden_layers={args.n_layers}, hidden_size={args.dim}) "
                         f"need {n * dtype.itemsize / 2**30:.1f} GiB in {dtype} but {device} has "
                         f"{free / 2**30:.1f} GiB free")


def memory_estimate(args, *, micro_batch, seq_len, train=True, grad_ckpt=False, param_bytes=4, optimizer="adamw",
                    act_bytes=2, seqs_per_item=1, shards=1) -> dict:
    """Bytes one rank needs for a step on micro_batch items of seq_len tokens (seqs_per_item sequences each: 2 for
    a DNO pair). Weights, gradients and the optimizer state (AdamW: exp_avg and exp_avg_sq in the parameter dtype,
    fp32 in train.py; sgd: none) are split over `shards` FSDP ranks. Activations kept for backward, per token,
    C = dim, H/K = query/kv heads, D = head_dim, F = hidden_dim, a = act_bytes (2 under bf16 autocast, 4 in fp32):
        per layer   16 C + 4 H                 fp32 residual input and normalised output of both RMSNorms, the
                  + a (2HD + 2KD + 4F)         attention's logsumexp; q, k, v, attention output, gate, up,
                                               silu(gate), their product
                  + a 2C, or a 5C (autocast)   the matmul inputs: both norm outputs, or under autocast the cast
                                               copy each of the five q/k/v/gate/up matmuls keeps
        grad_ckpt   4 C per layer (the block input), plus one layer's full set recomputed during backward
        head        a (V + C) + 8 C            HeadLogp's (N, V) exp buffer and input, the final norm (N <= tokens)
    weight_copies: a bytes per matmul weight, the cast weights kept for backward (autocast is assumed when a <
    param_bytes and shards == 1; FSDP2's MixedPrecisionPolicy hands the blocks bf16 weights, no cast).
    Not training (generation, sample.py): a KV cache of 2 K D a per token per layer, one layer's working set and
    (B, V) float32 logits. The estimate leaves out allocator fragmentation and the CUDA context."""
    if optimizer not in ("adamw", "sgd"):
        raise ModelError(f"optimizer must be adamw or sgd, got {optimizer!r}")
    C, F, H, K, D, V, L = (args.dim, args.hidden_dim, args.n_heads, args.n_kv_heads, args.head_dim, args.vocab_size,
                           args.n_layers)
    B = micro_batch * seqs_per_item
    tokens, n = B * seq_len, count_params(args)
    cast = act_bytes < param_bytes  # autocast: matmuls keep cast copies of their inputs and weights for backward
    layer = 16 * C + 4 * H + act_bytes * (2 * H * D + 2 * K * D + 4 * F + (5 if cast else 2) * C)  # per token
    if train:
        kept = 4 * C * L + layer if grad_ckpt else layer * L
        # the embedding is no matmul; under FSDP the weights arrive in bf16 already (MixedPrecisionPolicy)
        copies = (n - V * C * (not args.tie_embeddings)) * act_bytes * cast * (shards == 1)
        act, kv = tokens * (kept + act_bytes * (V + C) + 8 * C), 0
    else:
        copies, act, kv = 0, tokens * layer + B * V * 4, tokens * L * 2 * K * D * act_bytes
    weights = n * param_bytes // shards
    grads = weights if train else 0
    opt = 2 * weights if train and optimizer == "adamw" else 0
    return dict(params=n, weights=weights, grads=grads, optimizer=opt, weight_copies=copies, activations=act,
                kv_cache=kv, total=weights + grads + opt + copies + act + kv)


PARTS = ("weights", "grads", "optimizer", "weight_copies", "activations", "kv_cache")  # memory_estimate's sums


def check_memory(args, device, **kw) -> dict:
    """memory_estimate(args, **kw) plus free=bytes free on device; a one-line ModelError with what to change when
    the total does not fit. Call it before loading or training so a run fails in seconds, not at the first OOM.
    act_bytes, unless given, follows train.py: bf16 autocast (2) on CUDA, float32 (4) elsewhere."""
    kw.setdefault("act_bytes", 2 if torch.device(device).type == "cuda" else 4)
    est = memory_estimate(args, **kw)
    est["free"] = free = free_memory(device)
    if free is None or est["total"] <= free:
        return est
    fixed = est["weights"] + est["grads"] + est["optimizer"] + est["weight_copies"]
    per_item = (est["total"] - fixed) / kw["micro_batch"]  # activations and KV cache grow with the micro-batch
    fit = int((free - fixed) // per_item) if free > fixed else 0
    hints = [f"lower --micro_batch to {fit}"] if fit >= 1 else []
    ckpt = dict(kw, grad_ckpt=True)
    if kw.get("train", True) and not kw.get("grad_ckpt") and memory_estimate(args, **ckpt)["total"] <= free:
        hints.append("pass --grad_ckpt true")
    hints = hints or ["use a larger device, or shard over more GPUs with torchrun" if fixed > free
                      else "shorten the sequences or use a larger device"]
    g = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    parts = " + ".join(f"{k.replace('_', ' ')} {g(est[k])}" for k in PARTS if est[k])
    raise ModelError(f"needs ~{g(est['total'])} GiB on {device} ({parts}) but {g(free)} GiB is free: "
                     f"{' or '.join(hints)}")


if __name__ == "__main__":
    import tempfile

    torch.manual_seed(0)
    args = ModelArgs(arch="llama", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                     hidden_dim=128, max_seq_len=128, rope_theta=500000.0,
                     rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=32))
    model = Transformer(args).eval()
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad(), tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        again = Transformer.from_pretrained(d)
        diff = (model(idx) - again(idx)).abs().max().item()
    print(f"{model.num_params():,} params; logits {tuple(model(idx).shape)}; save->load max |diff| {diff:.2e}")
    mistral7b = ModelArgs(arch="mistral", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                          head_dim=128, hidden_dim=14336)
    for ckpt in (False, True):  # the paper's model, one pair per micro-batch, 2048 tokens, bf16 autocast, one rank
        est = memory_estimate(mistral7b, micro_batch=1, seq_len=2048, seqs_per_item=2, grad_ckpt=ckpt)
        print(f"Mistral-7B train step, grad_ckpt={ckpt}: " + ", ".join(f"{k} {v / 2**30:.1f} GiB"
              for k, v in est.items() if k != "params") + f" ({est['params']:,} params)")

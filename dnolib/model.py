"""A from-scratch Llama-family decoder (Llama, Mistral, Qwen2, Qwen3), Hugging Face checkpoint I/O.

    python model.py                                   # CPU demo: tiny random model, save -> load
    from dnolib.model import Transformer
    from dnolib.budget import check_memory
    from dnolib.model_io import load_tokenizer, resolve_model
    path = resolve_model("Qwen/Qwen2.5-0.5B-Instruct")  # a local folder as is, or a hub id -> its cached snapshot
    tok = load_tokenizer(path)                        # AutoTokenizer, trust_remote_code=False, one-line errors
    m = Transformer.from_pretrained(path, dtype=torch.bfloat16, device="cuda")
    logits = m(idx)                                   # (B, T) token ids -> (B, T, V) float32 logits
    logp = m(idx, select=sel, targets=tgt)            # training: log p(tgt) (N,) at the N positions where sel (B, T)
    m.save_pretrained("out/", tokenizer=tok)          # transformers.AutoModelForCausalLM loads this folder
    check_memory(m.args, "cuda", micro_batch=8, seq_len=2048, seqs_per_item=2)  # ModelError if a step cannot fit

Covers what transformers saves for LlamaForCausalLM (grouped-query attention, rope_theta, "llama3"
and "linear" rope scaling, optional attention/mlp bias), MistralForCausalLM (sliding window),
Qwen2ForCausalLM (q/k/v bias, tied embeddings) and Qwen3ForCausalLM (RMSNorm on q and k per head).
Checkpoints: safetensors only (one file or a sharded index), never pickle. Our parameter names are
transformers' names without the "model." prefix, so the whole checkpoint mapping is
model_io.HF_PREFIX.

KV cache (sample.py samples with it): setup_cache, prefill, copy_rows, keep_rows and decode are
defined in this file, before the Transformer, and bound to it as methods.

Folders, hub ids and tokenizers live in model_io.py, memory budgets in budget.py (import them
from there). A folder's mistakes are one-line `ModelError`s (a ValueError) naming the file:
config.json lacking a key or describing an unsupported model; tensors missing, unexpected or
mis-shaped; custom code
("auto_map"), which is refused, never run.

Notes (the paper's model is Orca-2.5 = Mistral-7B):
 1. Rope types other than default/llama3/linear (yarn, dynamic, longrope) and per-layer sliding
    windows (Qwen use_sliding_window) are rejected with a ModelError rather than approximated.
 2. Padded query positions attend to themselves (finite garbage instead of NaN); their outputs are
    never used.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dnolib.budget import check_fits
from dnolib.model_io import ModelError, read_config, read_weights, stored_dtype, write_weights

ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
         "Qwen3ForCausalLM": "qwen3"}
REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "max_position_embeddings")


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
        """transformers' config.json dict -> ModelArgs; ModelError naming `source` when it cannot
        describe a model."""
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
        # transformers v5 | v4 layout
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
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
    """(head_dim / 2,) float32 rotary frequencies, with llama3 / linear context-extension rescaling."""
    inv = 1.0 / a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.float32,
                                              device="cpu") / a.head_dim)
    r = a.rope_scaling
    if r.get("rope_type", r.get("type")) == "linear":
        return inv / r["factor"]
    # long wavelengths slowed by `factor`, short kept, blend between
    if r.get("rope_type", r.get("type")) == "llama3":
        old, lo, hi = r["original_max_position_embeddings"], r["low_freq_factor"], r["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)
        scaled = torch.where(wavelen > old / lo, inv / r["factor"], inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        return torch.where(mid, (1 - smooth) * inv / r["factor"] + smooth * inv, scaled)
    return inv


# x (B, H, T, D); cos/sin (B, 1, T, D); transformers' half-split rotation layout
def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalise in float32, scale in the model dtype (as transformers does)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = a.n_heads, a.n_kv_heads, a.head_dim
        self.q_proj = nn.Linear(a.dim, a.n_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=a.o_bias)
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, a.norm_eps)
            self.k_norm = RMSNorm(a.head_dim, a.norm_eps)
        self.cache = None

    def forward(self, x, cos, sin, mask, fill=None, step=None):
        """fill (rows, src): prefill, write k/v into those cache rows; step (pos, kv_len): decode,
        write slot pos (N,) of every row, then attend over cache slots [0, kv_len)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, H_kv, T, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        # (B, H, T, D)
        q, k = rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin)
        if fill is not None:        # prefill attends its own k/v
            self.cache.fill(*fill, k, v)
        if step is not None:
            self.cache.write(step[0], k, v)
            k, v = self.cache.k[:, :, :step[1]], self.cache.v[:, :, :step[1]]
        # training / unpadded: causal, fused kernel, GQA without copying k/v
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               enable_gqa=self.n_kv != self.n_heads)
        else:
            # fold the G query heads sharing a kv head into the time axis: no k/v repeat
            G = self.n_heads // self.n_kv
            qg = q.reshape(B, self.n_kv, G * T, self.hd)  # head h = kv * G + g
            if T > 1:
                mask = mask.repeat(1, 1, G, 1)
            y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
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

    def forward(self, x, cos, sin, mask, fill=None, step=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, fill, step)
        return x + self.mlp(self.post_attention_layernorm(x))


class HeadLogp(torch.autograd.Function):
    """log softmax(h W^T)[target] per row with a single (N, V) buffer. Forward: logits -> exp(logits
    - rowmax) in place, kept for backward; backward scales it in place into the logits' gradient, g
      (onehot - softmax), then
    two matmuls. (Autograd through lm_head, logsumexp and gather would hold two or three (N, V)
    tensors and make several more passes over them.) One backward only. Under autocast the matmuls
    run in the autocast dtype and the exp/sums in float32."""
    @staticmethod
    def forward(ctx, h, w, targets):  # h (N, C), w (V, C), targets (N,) long
        dt = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        # softmax math in >= float32
        acc = torch.promote_types(dt, torch.float32)
        hc, wc = h.to(dt), w.to(dt)
        logits = hc @ wc.t()                                               # (N, V)
        zt = logits.gather(-1, targets[:, None]).squeeze(-1).to(acc)      # (N,) target logit
        m = logits.amax(-1, keepdim=True).to(acc)                          # (N, 1)
        s = torch.empty(len(h), dtype=acc, device=h.device)                # (N,) sum exp(z - m)
        # row chunks bound the temporaries
        for r in range(0, len(h), 1024):
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
            # -g softmax
            e[r:r + 1024].copy_(e[r:r + 1024].to(s.dtype).mul_(scale[r:r + 1024, None]))
        # + g onehot: d loss / d logits
        e.scatter_add_(1, targets[:, None], g[:, None].to(e.dtype))
        gh = (e @ wc).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None    # (N, C)
        gw = (e.t() @ hc).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None  # (V, C)
        return gh, gw, None



# ------------------------------------------------------------ the KV cache for sampling
# CPU BLAS (MKL / oneDNN) runs a matmul of 1-3 rows through other kernels than 4+ rows, which round
# differently: the sampler never multiplies fewer rows, so a sample does not depend on its batch
MIN_ROWS = 4


class KVCache(nn.Module):
    def __init__(self, n, n_kv_heads, seq_len, head_dim, dtype, device):
        super().__init__()
        shape = (n, n_kv_heads, seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    # prefill: k/v (B, H_kv, T, D) of B prompts; prompt src[j] -> row rows[j] (slots past the
    # cache's end are padding: dropped)
    def fill(self, rows, src, k, v):
        T = min(k.shape[2], self.k.shape[2])
        self.k[rows, :, :T] = k[src, :, :T]
        self.v[rows, :, :T] = v[src, :, :T]

    # decode: row r writes its slot pos[r]; pos (N,), k/v (N, H_kv, 1, D)
    def write(self, pos, k, v):
        r = torch.arange(len(pos), device=pos.device)
        self.k[r, :, pos] = k[:, :, 0]
        self.v[r, :, pos] = v[:, :, 0]


def make_mask(key_valid, q_slots, window=0):
    """(B, 1, T, S) bool attention mask: key s visible from query slot q if valid, s <= q (causal)
    and inside the sliding window; every query also sees itself so fully padded rows stay finite.
    key_valid (B, S), q_slots (T,)."""
    k_slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    m = key_valid[:, None, None, :] & (k_slots <= q_slots[:, None])
    if window:
        m = m & (q_slots[:, None] - k_slots < window)
    return m | (k_slots == q_slots[:, None])


def setup_cache(model, n_rows, max_seq_len, dtype=None, device=None):
    """Preallocate a static (N, H_kv, S, D) cache per layer; same-shaped caches are reused
    (torch.compile)."""
    w = model.embed_tokens.weight
    dtype, device = dtype or w.dtype, torch.device(device or w.device)
    shape = (n_rows, model.args.n_kv_heads, max_seq_len, model.args.head_dim)
    # undo keep_rows: the full-size tensors (compiled graphs point at them)
    for m, name, x in model._full_rows:
        setattr(m, name, x)
    model._full_rows = []
    for layer in model.layers:
        c = layer.self_attn.cache
        if c is None or c.k.shape != shape or c.k.dtype != dtype or c.k.device != device:
            layer.self_attn.cache = KVCache(*shape[:3], model.args.head_dim, dtype, device)
    kv = model.key_valid
    if kv is None or kv.shape != (n_rows, max_seq_len) or kv.device != device:
        # buffers:
        model.key_valid = torch.zeros(n_rows, max_seq_len, dtype=torch.bool, device=device)
        # CUDA graphs mutate them
        model.next_pos = torch.zeros(n_rows, dtype=torch.long, device=device)
    cos, sin = model._rope(torch.arange(max_seq_len, device=device)[None], dtype)  # (1, 1, S, D)
    model.rope_table = cos[0, 0], sin[0, 0]  # (S, D): decode looks its positions up


def clear_cache(model):
    """Free the KV cache (e.g. before training the same module)."""
    for layer in model.layers:
        layer.self_attn.cache = None
    model.key_valid, model.next_pos, model._full_rows, model.rope_table = None, None, [], None


# rows (n,) now hold prompts of lens (n,) tokens in slots [0, len)
def _start_rows(model, rows, lens):
    slots = torch.arange(model.key_valid.shape[1], device=rows.device)
    model.key_valid[rows] = slots < lens[:, None]
    model.next_pos[rows] = lens


@torch.no_grad()
def prefill(model, idx, lens, rows, src):
    """Run B RIGHT-padded prompts idx (B, T) of lens (B,) tokens once; prompt src[j] fills cache
    row rows[j] (slots [0, T), the padding masked), so one prompt can start several samples.
    Causal attention never sees the padding on the right. Returns each prompt's last-token
    logits (B, V)."""
    if idx.numel() < MIN_ROWS:  # pad on the right (causal: unseen by the prompt), see MIN_ROWS
        idx = F.pad(idx, (0, -(-MIN_ROWS // idx.shape[0]) - idx.shape[1]))
    B, T = idx.shape
    slots = torch.arange(T, device=idx.device)
    w = model.args.sliding_window
    mask = make_mask(torch.ones_like(idx, dtype=torch.bool), slots, w) if w and T > w else None
    last = slots == (lens[:, None] - 1)  # (B, T): one position per prompt
    logits = model._trunk(idx, slots.expand(B, T), mask, fill=(rows, src), select=last)
    _start_rows(model, rows, lens[src])
    return logits


@torch.no_grad()
def copy_rows(model, src, dst, lens):
    """Cache rows dst (n,) start from the prompts already in rows src (n,): their first lens
    (n,) slots."""
    n = int(lens.max())
    for layer in model.layers:
        c = layer.self_attn.cache
        c.k[dst, :, :n] = c.k[src, :, :n]
        c.v[dst, :, :n] = c.v[src, :, :n]
    _start_rows(model, dst, lens)


def keep_rows(model, keep, n_slots):
    """Drop finished rows from the decode batch (sample.py): move cache rows keep (n,), sorted,
    to rows 0..n-1 in place and shrink every per-row tensor -- k, v (N, H_kv, S, D), key_valid
    (N, S), next_pos (N,) -- to a view of its first n rows (same storage; nothing allocated but
    the gather). Slots [0, n_slots) hold keys."""
    rows = [(layer.self_attn.cache, n) for layer in model.layers for n in ("k", "v")]
    rows += [(model, "key_valid"), (model, "next_pos")]
    if not model._full_rows:  # the first shrink of this batch: setup_cache gives these back
        model._full_rows = [(m, name, getattr(m, name)) for m, name in rows]
    for m, name in rows:
        x = getattr(m, name)
        if x.dim() == 4:  # k / v: only the slots written so far
            x[:len(keep), :, :n_slots] = x[keep, :, :n_slots]
        else:
            x[:len(keep)] = x[keep]
        setattr(m, name, x[:len(keep)])


@torch.no_grad()
def decode(model, tok, kv_len):
    """One step for all N rows: tok (N,) long is written at each row's own slot next_pos (N,),
    which is also its rope position; kv_len: slots attended (the longest row's + 1 eager; the
    full cache length when compiled, so shapes stay static). Returns logits (N, V). A row at the
    cache's end stays there (idle rows decode garbage until they are refilled or dropped)."""
    pos = model.next_pos
    model.key_valid.scatter_(1, pos[:, None], True)
    mask = model.key_valid[:, :kv_len]  # (N, kv_len)
    if model.args.sliding_window:
        k_slots = torch.arange(kv_len, device=tok.device)
        mask = mask & (pos[:, None] - k_slots < model.args.sliding_window)
    cos, sin = (t[pos][:, None, None] for t in model.rope_table)  # (N, 1, 1, D)
    # additive mask, made once for every layer (what SDPA would make of the bool one per call)
    bias = torch.zeros(mask.shape, dtype=cos.dtype, device=mask.device)
    bias.masked_fill_(~mask, float("-inf"))  # (N, kv_len)
    logits = model._trunk(tok[:, None], pos[:, None], bias[:, None, None], step=(pos, kv_len),
                         rope=(cos, sin))[:, -1]
    model.next_pos.add_(1).clamp_(max=model.key_valid.shape[1] - 1)
    return logits


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        # config: the HF config.json dict save_pretrained writes
        self.args, self.config = args, args.to_hf_config()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        # FSDP2 shards each Block
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # plain attribute, not a buffer: stays float32 when the model is cast
        self.inv_freq = rope_inv_freq(args)
        # (N, S) bool once setup_cache is called
        self.register_buffer("key_valid", None, persistent=False)
        # (N,) long: each row's next rope position
        self.register_buffer("next_pos", None, persistent=False)
        # [(module, name, full-size tensor)] while keep_rows has shrunk them to views
        self._full_rows = []

    # pos (B, T) -> cos, sin (B, 1, T, D), computed in float32 like transformers
    def _rope(self, pos, dtype):
        if self.inv_freq.device != pos.device:
            self.inv_freq = self.inv_freq.to(pos.device)
        f = pos[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((f, f), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _trunk(self, idx, pos, mask, fill=None, step=None, select=None, targets=None, rope=None):
        x = self.embed_tokens(idx)  # (B, T, C)
        cos, sin = self._rope(pos, x.dtype) if rope is None else rope
        for layer in self.layers:
            x = layer(x, cos, sin, mask, fill, step)
        # only the rows that are scored go through the norm and the vocab projection
        if select is not None:
            x = x[select]           # (N, C)
            if targets is not None:
                # (N,) log p(target)
                return HeadLogp.apply(self.norm(x), self.lm_head.weight, targets)
            n = len(x)
            if n < MIN_ROWS:        # pad with zero rows (dropped below), see MIN_ROWS
                x = torch.cat([x, x.new_zeros(MIN_ROWS - n, x.shape[1])])
            return self.lm_head(self.norm(x))[:n].float()  # (N, V)
        return self.lm_head(self.norm(x)).float()  # (B, T, V)

    def forward(self, idx, attention_mask=None, select=None, targets=None):
        """idx (B, T) -> logits (B, T, V) float32, no cache. attention_mask (B, T) {0,1} for
        LEFT-padded batches; training uses right padding and passes none (fused causal attention).
        select (B, T) bool: return only the selected positions' logits (N, V), N = select.sum(),
        row-major order (training scores response tokens only; the vocab projection is a large share
        of a small model's FLOPs). targets (N,) long, with select: return log p(targets) (N,)
        float32 through HeadLogp (no (N, V) grad graph)."""
        B, T = idx.shape
        q_slots = torch.arange(T, device=idx.device)
        if attention_mask is None:
            pos = q_slots.expand(B, T)
            w = self.args.sliding_window
            mask = make_mask(torch.ones_like(idx, dtype=torch.bool), q_slots, w) if w and T > w else None
        else:
            # per-row positions under left padding
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            mask = make_mask(attention_mask.bool(), q_slots, self.args.sliding_window)
        return self._trunk(idx, pos, mask, select=select, targets=targets)

    # ---- the KV cache for sampling (above), bound here as methods so torch.compile sees the module ----
    setup_cache, clear_cache, prefill = setup_cache, clear_cache, prefill
    copy_rows, keep_rows, decode = copy_rows, keep_rows, decode

    # ---- Hugging Face checkpoint I/O ----
    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Transformer":
        """Load a local Hugging Face folder (see resolve_model for hub ids). User mistakes (bad
        config.json, a model too large for `device`, garbage / truncated / mis-shaped / missing
        tensors) raise a one-line error."""
        path = Path(path)
        cfg = read_config(path)
        args = ModelArgs.from_hf_config(cfg, source=path / "config.json")
        # before reading or allocating anything
        check_fits(args, device, dtype, path / "config.json")
        state = read_weights(path, device, dtype, args.tie_embeddings)  # {our name: tensor}
        with torch.device("meta"):
            model = cls(args)
        want = model.state_dict()
        missing = sorted(set(want) - set(state))
        if missing:
            raise ModelError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
        bad = [(k, tuple(state[k].shape), tuple(want[k].shape)) for k in want
               if state[k].shape != want[k].shape]
        if bad:
            raise ModelError(f"{path}: {len(bad)} tensors have the wrong shape for config.json, e.g. {bad[0][0]} "
                             f"is {bad[0][1]}, expected {bad[0][2]}")
        model.load_state_dict(state, strict=True, assign=True)
        if args.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.config = cfg  # keep every field of the original config.json for save_pretrained
        # its generation_config.json (eos list, top_p, ...) is copied by save_pretrained
        model.source = path
        # save_pretrained writes this dtype back (bf16 stays bf16)
        model.save_dtype = stored_dtype(path)
        return model.eval()

    def save_pretrained(self, path, tokenizer=None, state_dict=None, dtype=None):
        """Write config.json, generation_config.json, model.safetensors (+ tokenizer files).
        state_dict: a full (gathered) state dict when the module itself is sharded, e.g. under
        FSDP2. generation_config.json is the source folder's, unchanged, when the model was loaded
        from one that has it; else built from config.json. dtype: the weights' dtype on disk; None = the dtype the loaded checkpoint was stored in (a bf16 folder
        trained in float32 is saved bf16 again), or the tensors' own dtype for a model built in
        memory."""
        path = Path(path)
        dtype = dtype or getattr(self, "save_dtype", None)
        write_weights(path, state_dict if state_dict is not None else self.state_dict(), self.config,
                      self.args.tie_embeddings, getattr(self, "source", None), dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())



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

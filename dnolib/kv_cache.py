"""The KV cache for sampling: one row per sequence, each with its own slots, so rows start and end
at different steps (continuous batching in generate.py).

    python kv_cache.py                                # demo: cached greedy == recomputation
    model.setup_cache(N, S)                           # (N, H_kv, S, D) keys / values per layer
    logits = model.prefill(idx, lens, rows, src)      # RIGHT-padded prompts (B, T) -> rows; (B, V)
    model.copy_rows(src, dst, lens)                   # rows dst start from the prompts in rows src
    logits = model.decode(tok, kv_len)                # (N,) -> (N, V), each row's next slot
    model.keep_rows(keep, n_slots)                    # drop finished rows in place

These are functions of the model, bound as Transformer methods (model.py). `setup_cache(N, S)`
preallocates (N, H_kv, S, D) keys/values per layer. Each row holds one sequence from slot 0 with no
padding; its next slot (next_pos, also its rope position) and a (N, S) key-validity mask are per
row. `prefill` runs RIGHT-padded prompts once and writes each into the rows named for it (a
prompt's K samples); `copy_rows` starts a row from a prompt already in another row; `decode` writes
every row's own next slot; `keep_rows` drops idle rows in place (views of the full tensors, given
back by the next setup_cache, so compiled graphs keep their buffers).

Departures:
 1. MIN_ROWS: a matmul of 1-3 rows runs through other CPU BLAS kernels than 4+ rows and rounds
    differently, so prefill pads a batch of fewer than 4 tokens (on the right: causal attention
    never sees it) and the head pads fewer than 4 rows (model._trunk); generate.py never decodes
    fewer than 4 rows. A row's logits then do not depend on the batch width.
 2. Idle rows decode garbage until they are refilled or dropped; a row at the cache's end stays
    there.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

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
    """Drop finished rows from the decode batch (generate.py): move cache rows keep (n,), sorted,
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


if __name__ == "__main__":
    from dnolib.model import ModelArgs, Transformer

    torch.manual_seed(0)
    args = ModelArgs(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                     hidden_dim=128, max_seq_len=64)
    model = Transformer(args).eval()
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (5, 9, 3)]
    idx = torch.zeros(3, 9, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, :len(p)] = torch.tensor(p)
    lens = torch.tensor([5, 9, 3])
    model.setup_cache(6, 32)  # each prompt in two rows
    src = torch.arange(3).repeat_interleave(2)  # row r holds prompt r // 2
    logits = model.prefill(idx, lens, torch.arange(6), src)[src]  # (6, V)
    seqs = [list(prompts[r // 2]) for r in range(6)]
    for t in range(8):
        tok = logits.argmax(-1)  # (6,)
        for r in range(6):
            seqs[r].append(int(tok[r]))
        logits = model.decode(tok, max(map(len, seqs)))
    with torch.no_grad():
        naive = [model(torch.tensor([s[:-1]]))[0, -1].argmax().item() for s in seqs]
    same = all(s[-1] == n for s, n in zip(seqs, naive))
    print(f"6 rows (3 prompts x 2), 8 greedy steps: cached == recomputed last tokens: {same}")

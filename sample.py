"""sample.py: Alg. 2, line 4 -- K responses per prompt from pi_t (K = 5, temperature 0.7, top-p
0.95), KV-cached, with the batch always full (continuous batching), and its command line.

    python sample.py                            # CPU demo: cached greedy == naive greedy, tokens/s
    python sample.py --model DIR|ORG/NAME --prompts IN.jsonl --out OUT.jsonl --num_samples 5 \
        --max_new_tokens 512 --temperature 0.7 --top_p 0.95 --seed 0 --rows 0
        # add --device cuda --dtype bfloat16 --compile true on a GPU
    python bench/bench_eos.py                   # EOS on: vs batches of 16, lock-step, transformers
    from sample import generate, encode_prompt
    outs = generate(model, tok, ["Hi", [{"role": "user", "content": "Hi"}]], num_samples=5)
    outs[0][k] == {"tokens": [...], "text": "...", "finish_reason": "stop", "stop_token": 151645}

IN.jsonl lines: {"id"?: any, "prompt": str | [{"role", "content"}, ...]} (dnolib/prompts.py reads
them); OUT.jsonl lines: {"id", "prompt", "samples": [text] * K, "finish_reasons": ["stop" |
"length"] * K, "stop_tokens": [id | null] * K} (the stop id that ended each sample; null when it
ran out of tokens). Every flag, the device and the --out folder are checked before the model loads.
Each token is drawn by dnolib/top_p.py; the KV cache is dnolib/model.py's.

How it runs (continuous batching): every (prompt, sample) is a job; `rows` jobs decode at once, one
per KV cache row. A prompt is prefilled once, RIGHT-padded with the other prompts entering at the
same step, into the rows of its samples; a later sample of it copies those slots from a row still
holding them (copy_rows). Each row writes its own next slot (its length so far, also its rope
position) at every decode step (decode). When a row's job ends (a stop id, or max_new_tokens), the
row takes the next waiting job at once, so the batch stays full until the queue is empty; then idle
rows are dropped (keep_rows) once >= 25% of them are idle, never below model.MIN_ROWS = 4 rows (CPU
BLAS rounds a 1-3-row matmul differently). A run costs about the sum of its samples' lengths / rows
steps (bench/bench_eos.py). generate(refill=False) admits new jobs only when every row is idle
(lock-step batches, each starting at full width); compact=False keeps idle rows to the end (the old
lock-step baseline). Sampling is exact top-p by inverse CDF with three uniforms per (job, step),
drawn from a torch.Generator seeded by hash(seed, prompt id, sample index): a sample does not depend
on which other jobs share the rows, on `rows`, on prompt order, or on when rows were refilled or
dropped (the uniforms follow the job, and greedy stays equal to naive recomputation).

Departures from the paper (numbered):
 1. Once the queue is empty, idle rows keep decoding (their tokens discarded) until 25% of the rows
    are idle, to amortise the copy that drops them. Under compile=True the batch only halves (idle
    rows pad it to N / 2^j) so the compiled step sees few shapes. Finished rows are found by a host
    sync every step (also on CUDA).
 2. A prompt's id (its samples' seeds: row_seed) is the JSONL "id", default: the line number (the
    prompt's index in the list when generate is called directly).
 3. Bitwise, a prompt's first-token logits depend on the length its prefill group is padded to
    (CPU attention rounds differently per length); the decode steps do not depend on the batch.
    The EOS bench's 320 samples are identical at rows 5, 80, 160, 320 and in batches of 16.
"""
from dnolib.cli import early_help
if __name__ == "__main__":
    early_help(__file__)                                # --help before torch loads: under a second

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from dnolib.cli import cli
from dnolib.budget import free_memory, memory_estimate, pick_threads
from dnolib.model import MIN_ROWS, ModelArgs, Transformer
from dnolib.model_io import check_vocab, load_tokenizer, read_config, resolve_model
from dnolib.prompts import read_prompts
from dnolib.top_p import sample_tokens



CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


def encode_prompt(tokenizer, prompt) -> list:
    """Prompt -> token ids. str: tokenized as-is (tokenizer's default special tokens); list of
    {"role", "content"} messages: the tokenizer's chat template with the generation prompt; list of
    ints: taken as ids."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                   and isinstance(prompt[0], dict)):
        if tokenizer is None:
            raise ValueError("text and chat prompts need a tokenizer (pass token-id lists without one)")
    if isinstance(prompt, str):
        ids = tokenizer(prompt)["input_ids"]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; give plain-text prompts instead of messages")
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        raise ValueError("a prompt must be a string or a non-empty list of {\"role\": str, \"content\": str} messages")
    if not ids:
        raise ValueError("empty prompt")
    return ids


def default_stop_ids(tokenizer, model) -> list:
    """Tokenizer eos, the model config's eos id(s), and chat end tokens the vocabulary has."""
    ids = set()
    for eos in (getattr(tokenizer, "eos_token_id", None), model.config.get("eos_token_id")):
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    ids.update(vocab[t] for t in CHAT_END_TOKENS if t in vocab)
    return sorted(ids)


def row_seed(seed, prompt_id, k) -> int:
    """Seed of sample k of prompt `prompt_id`: the same whatever batch the sample is drawn in."""
    h = hashlib.blake2b(f"{seed}\x00{prompt_id}\x00{k}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def left_pad(prompts, pad_id=0):
    """list of token-id lists -> idx (B, T0), mask (B, T0) with the padding on the left."""
    T0 = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T0), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T0), dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, T0 - len(p):], mask[b, T0 - len(p):] = torch.tensor(p), 1
    return idx, mask


def right_pad(prompts, pad_id=0):
    """list of token-id lists -> idx (B, T), lens (B,) with the padding on the right."""
    idx = torch.full((len(prompts), max(len(p) for p in prompts)), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, :len(p)] = torch.tensor(p)
    return idx, torch.tensor([len(p) for p in prompts])


# drop idle rows once this fraction of the rows is idle and nothing waits (departure 1)
COMPACT_AT = 0.25


@dataclass
class Rows:
    """What the sampler keeps per cache row (N rows in flight); host tensors on the CPU, the rest on
    `dev`."""
    # (N,) host: the (prompt, sample) job j = prompt * K + k a row decodes; -1 = idle
    job: torch.Tensor
    # (N,) host: the cache slot the row writes next (prompt length + tokens so far)
    pos: torch.Tensor
    t: torch.Tensor       # (N,) tokens sampled so far = the step index into u and out
    # (N, M, 3) the job's uniforms (row_seed): a row's randomness follows its job
    u: torch.Tensor
    out: torch.Tensor     # (N, M) tokens sampled

    def keep(self, keep):  # keep (n,) sorted host rows -> the state of those rows only
        k = keep.to(self.t.device)
        return Rows(self.job[keep], self.pos[keep], self.t[k], self.u[k], self.out[k])


def _start(model, rows, free, jobs, prompts, K, seeds, first, M):
    """Jobs jobs (n,) enter the free cache rows free (n,): each prompt is prefilled once (the first
    of its K jobs to enter), later samples copy its slots from a row still holding it. first:
    {prompt: (V,) logits of its first token}, kept until its K-th sample entered. -> (n, V) logits
    of the new rows' first tokens."""
    dev = rows.t.device
    p_of = [j // K for j in jobs]
    taken = set(free)
    # {prompt: a busy row holding it}
    holder = {j // K: r for r, j in enumerate(rows.job.tolist()) if j >= 0 and r not in taken}
    new = sorted({p for p in p_of if p not in first or p not in holder})  # prompts to prefill
    free_t = torch.tensor(free)
    if new:
        src = [new.index(p) if p in new else -1 for p in p_of]
        fill = [i for i, s in enumerate(src) if s >= 0]
        idx, lens = right_pad([prompts[p] for p in new])
        logits = model.prefill(idx.to(dev), lens.to(dev), free_t[fill].to(dev),
                               torch.tensor([src[i] for i in fill], device=dev))  # (B, V)
        first.update({p: logits[b] for b, p in enumerate(new)})
    copy = [i for i, p in enumerate(p_of) if p not in new]
    if copy:
        lens = torch.tensor([len(prompts[p_of[i]]) for i in copy], device=dev)
        model.copy_rows(torch.tensor([holder[p_of[i]] for i in copy], device=dev),
                        free_t[copy].to(dev), lens)
    logits = torch.stack([first[p] for p in p_of])
    for j in jobs:
        if j % K == K - 1:
            first.pop(j // K)
    rows.job[free_t] = torch.tensor(jobs)
    rows.pos[free_t] = torch.tensor([len(prompts[p]) for p in p_of])
    free_d = free_t.to(dev)
    rows.t[free_d] = 0
    rows.out[free_d] = -1
    rows.u[free_d] = torch.stack([torch.rand(M, 3, generator=torch.Generator().manual_seed(seeds[j]))
                                  for j in jobs]).to(dev)
    return logits


@torch.no_grad()
def _decode_all(model, prompts, K, seeds, n_rows, M, temperature, top_p, stops, step, static, refill,
                compact, on_done=lambda n: None):
    """Every (prompt, sample) job j = p * K + k through n_rows cache rows -> {j: raw tokens} (stop
    id included). refill: a row that finishes takes the next waiting job at once (continuous
    batching); else new jobs enter only once every row is idle (the lock-step batches of before).
    compact: drop idle rows once nothing waits for them (departure 1)."""
    dev = model.embed_tokens.weight.device
    S = max(len(p) for p in prompts) + M
    if static:  # round the cache length so compiled shapes repeat across calls
        S = -(-S // 256) * 256
    # N jobs in flight in W >= MIN_ROWS cache rows (idle rows pad a smaller batch)
    J, N = len(prompts) * K, min(n_rows, len(prompts) * K)
    W = max(N, MIN_ROWS)
    rows, logits = _full_width(model, W, S, M, dev)  # logits (n, V): each row's next token's
    stop_t = torch.tensor(stops, dtype=torch.long, device=dev)
    results, first, waiting = {}, {}, 0  # jobs 0 .. waiting-1 have entered
    while True:
        idle = (rows.job < 0).nonzero()[:, 0].tolist()
        if not refill and len(idle) == len(rows.job) < W and waiting < J:
            # lock-step: the last batch was compacted; the next one starts at full width again
            rows, logits = _full_width(model, W, S, M, dev)
            idle = list(range(W))
        free = []  # the rows jobs enter now: at most N busy
        if idle and waiting < J and (refill or len(idle) == len(rows.job)):
            free = idle[:min(J - waiting, N - (len(rows.job) - len(idle)))]
        if free:
            logits[free] = _start(model, rows, free, list(range(waiting, waiting + len(free))), prompts, K,
                                  seeds, first, M)
            waiting += len(free)
        if bool((rows.job < 0).all()):
            break
        n = len(rows.job)
        ar = torch.arange(n, device=dev)
        t = rows.t.clamp(max=M - 1)  # idle rows stay in bounds
        tok = sample_tokens(logits, rows.u[ar, t], temperature, top_p)  # (n,)
        rows.out[ar, t] = tok
        done = (rows.t >= M - 1) | torch.isin(tok, stop_t)  # (n,) this token ends the row's job
        rows.t += 1
        rows.pos += 1
        done = done.cpu() & (rows.job >= 0)
        if bool(done.any()):
            ended = done.nonzero()[:, 0]
            for r, toks in zip(ended.tolist(), rows.out[ended.to(dev)].tolist()):
                results[int(rows.job[r])] = toks
            rows.job[ended] = -1
            on_done(len(ended))
            busy = rows.job >= 0
            if (compact and (waiting == J or not refill) and busy.any()
                    and (~busy).sum() >= COMPACT_AT * n):
                keep = _rows_to_keep(busy, static, MIN_ROWS)
                if len(keep) < n:
                    model.keep_rows(keep.to(dev), int(rows.pos[busy].max()))
                    rows, tok, logits = rows.keep(keep), tok[keep.to(dev)], logits[keep.to(dev)]
            if bool((rows.job < 0).all()):
                continue
        kv_len = S if static else int(rows.pos[rows.job >= 0].max())
        logits = step(tok, kv_len)  # (n, V); each row wrote its slot pos - 1
    return results


def _full_width(model, N, S, M, dev):
    """N idle rows over a (N, S) cache (setup_cache also undoes keep_rows) -> Rows, logits (N, V)."""
    model.setup_cache(N, S)
    rows = Rows(job=torch.full((N,), -1), pos=torch.zeros(N, dtype=torch.long),
                t=torch.zeros(N, dtype=torch.long, device=dev),
                u=torch.zeros(N, M, 3, device=dev), out=torch.full((N, M), -1, device=dev))
    return rows, torch.zeros(N, model.args.vocab_size, device=dev)


def _rows_to_keep(busy, static, at_least=1):
    """busy (n,) bool host -> sorted rows to keep: the busy ones, padded with idle rows up to
    at_least rows. static (compiled step): padded up to n / 2^j so the compiled step sees at most
    log2(N) + 1 shapes."""
    keep = busy.nonzero()[:, 0]
    n = min(len(busy), max(len(keep), at_least))
    if static:
        n = len(busy)
        while n // 2 >= max(len(keep), at_least):
            n //= 2
    if n > len(keep):
        keep = torch.cat([keep, (~busy).nonzero()[:, 0][:n - len(keep)]]).sort().values
    return keep


def check_sampling(num_samples, max_new_tokens, temperature, top_p, rows):
    """One-line ValueError for an impossible sampling setting (generate() and the CLI, before any
    work)."""
    for name, v in [("num_samples", num_samples), ("max_new_tokens", max_new_tokens),
                    ("rows", rows)]:
        if not isinstance(v, int) or v < 0 or (v == 0 and name != "rows"):
            raise ValueError(f"{name} must be an integer >= {int(name != 'rows')}, got {v!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


# more rows than this buys little on one GPU; on a CPU thread each step has a fixed cost, which
# more rows amortise (bench/bench_eos.py: all 320 jobs at once beat 64 or 160 in flight)
ROWS_CAP = {"cpu": 512, "cuda": 256}


def default_rows(model, longest, max_new_tokens, share=0.5) -> int:
    """Cache rows in flight when --rows is 0: as many as the memory estimate fits in `share` of the
    free memory (KV cache, one layer's working set, logits), at most ROWS_CAP."""
    w = model.embed_tokens.weight
    cap = ROWS_CAP.get(w.device.type, 64)
    free = free_memory(w.device)
    if free is None:
        return cap
    kw = dict(seq_len=longest + max_new_tokens, train=False, param_bytes=w.element_size(),
              act_bytes=w.element_size())
    one, two = (memory_estimate(model.args, micro_batch=b, **kw)["total"] for b in (1, 2))
    return max(1, min(cap, int((share * free - (2 * one - two)) // (two - one))))


def generate(model, tokenizer, prompts, *, num_samples=1, max_new_tokens=128, temperature=0.7, top_p=0.95,
             seed=0, ids=None, stop_ids=None, rows=0, progress=False, compile=False, refill=True,
             compact=True):
    """For each prompt, K = num_samples dicts {"tokens" (response, stop token excluded), "text",
    "finish_reason": "stop" | "length", "stop_token": the stop id that ended it, or None}. ids:
    per-prompt ids for the per-(id, sample, seed) RNG (default: index). stop_ids: None =
    default_stop_ids; [] = never stop. rows: (prompt, sample) jobs decoded at once, 0 =
    default_rows. refill=False: new jobs wait until every row is idle (lock-step batches); with
    compact=False as well, rows finish together (the old lock-step baseline; the samples are the
    same, only slower)."""
    ids = list(range(len(prompts))) if ids is None else list(ids)
    if len(ids) != len(prompts):
        raise ValueError(f"{len(ids)} ids for {len(prompts)} prompts")
    check_sampling(num_samples, max_new_tokens, temperature, top_p, rows)
    if not prompts:
        return []
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    ctx = model.args.max_seq_len
    for i, e in enumerate(encoded):
        if len(e) >= ctx:
            raise ValueError(f"prompt {ids[i]!r} has {len(e)} tokens; the model's context is {ctx} tokens")
    # a row stops at the context: no row needs more room than that (nor a KV cache sized past it)
    max_new_tokens = min(max_new_tokens, ctx - min(map(len, encoded)))
    stops = default_stop_ids(tokenizer, model) if stop_ids is None else sorted(set(stop_ids))
    step = model.decode
    # CUDA graphs over the static-shape decode step; kept on the model so later calls reuse it
    if compile:
        if getattr(model, "compiled_decode", None) is None:
            # graphs need CUDA
            mode = "reduce-overhead" if model.embed_tokens.weight.is_cuda else "default"
            model.compiled_decode = torch.compile(model.decode, mode=mode, fullgraph=True)
        step = model.compiled_decode
    rows = rows or default_rows(model, max(map(len, encoded)), max_new_tokens)
    # similar lengths prefill together
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    K = num_samples
    seeds = [row_seed(seed, ids[i], k) for i in order for k in range(K)]
    with tqdm(total=len(prompts) * K, desc="sampling", unit="sample", disable=not progress) as bar:
        raw = _decode_all(model, [encoded[i] for i in order], K, seeds, rows, max_new_tokens, temperature,
                          top_p, stops, step, compile, refill, compact, bar.update)
    results = [None] * len(prompts)
    for q, i in enumerate(order):
        results[i] = [_finish(raw[q * K + k], tokenizer, set(stops), ctx - len(encoded[i]))
                      for k in range(K)]
    # the compiled step's CUDA graphs keep pointing at the cache buffers: keep them then
    if not compile:
        model.clear_cache()
    return results


def _finish(row, tokenizer, stops, budget):
    """Raw tokens of one row -> the response up to its first stop id, capped at the context left."""
    cut = next((j for j, t in enumerate(row) if t in stops), None)
    if cut is not None and cut < budget:
        tokens, reason, stop = row[:cut], "stop", row[cut]
    else:
        tokens, reason, stop = row[:budget], "length", None
    text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else ""
    return {"tokens": tokens, "text": text, "finish_reason": reason, "stop_token": stop}


@torch.no_grad()
def naive_greedy(model, prompts, max_new_tokens):
    """Test oracle: greedy decoding by recomputing the whole left-padded batch every step, no
    cache."""
    idx, mask = left_pad(prompts)
    for _ in range(max_new_tokens):
        tok = model(idx, attention_mask=mask)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        idx, mask = torch.cat([idx, tok], 1), torch.cat([mask, torch.ones_like(tok)], 1)
    return idx[:, -max_new_tokens:].tolist()


def demo(compile=False):
    """Tiny random Llama: cached greedy must equal naive recomputation; then sampling throughput."""
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the dev box is shared; tokens/s below are single-threaded
    args = ModelArgs(arch="llama", vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
                     hidden_dim=256, max_seq_len=512)
    model = Transformer(args).eval()
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (5, 17, 9, 12, 3, 20, 8, 14)]
    t0 = time.perf_counter()
    cached = generate(model, None, prompts, max_new_tokens=64, temperature=0, stop_ids=[])
    t1 = time.perf_counter()
    naive = naive_greedy(model, prompts, 64)
    t2 = time.perf_counter()
    same = all(c[0]["tokens"] == n for c, n in zip(cached, naive))
    print(f"greedy, 8 left-padded prompts x 64 tokens: cached == naive recomputation: {same} "
          f"(cached {t1 - t0:.2f}s, naive {t2 - t1:.2f}s)")
    t0 = time.perf_counter()
    outs = generate(model, None, prompts, num_samples=4, max_new_tokens=64, stop_ids=[],
                    compile=compile)
    dt = time.perf_counter() - t0
    n = sum(len(s["tokens"]) for o in outs for s in o)
    print(f"sampling 8 prompts x 4 samples x 64 tokens ({model.num_params() / 1e6:.2f}M params, CPU): "
          f"{n} tokens in {dt:.2f}s = {n / dt:.0f} tokens/s")
    if not same:
        sys.exit("error: cached greedy differs from naive recomputation")


# ----------------------------------------------------------------------------- the command line

@dataclass
class Config:
    model: str = ""               # Hugging Face model folder or hub id ORG/NAME; empty = the built-in demo
    prompts: str = ""             # input JSONL
    out: str = ""                 # output JSONL
    num_samples: int = 5          # K samples per prompt (paper: 5)
    max_new_tokens: int = 512
    temperature: float = 0.7      # paper: 0.7; 0 = greedy
    top_p: float = 0.95           # paper: 0.95
    seed: int = 0
    rows: int = 0                 # (prompt, sample) rows decoded at once; 0 = what fits (default_rows)
    dtype: str = "float32"        # float32 | bfloat16 | float16
    device: str = "cpu"
    compile: bool = False         # torch.compile the decode step (CUDA graphs on a GPU, inductor on CPU)
    threads: str = "auto"         # CPU threads: auto = what the model size warrants | N


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device(name) -> torch.device:
    """--device string -> torch.device, or a one-line ValueError when it is malformed or not on this
    machine."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported --device {name!r}; use cpu, cuda or cuda:N")
    return dev


def check_config(cfg: Config):
    """Every flag, the device and the --out folder, before the model loads or anything is
    generated."""
    if not cfg.prompts or not cfg.out:
        raise ValueError("--prompts IN.jsonl and --out OUT.jsonl are required with --model")
    check_sampling(cfg.num_samples, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.rows)
    if cfg.dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {cfg.dtype!r}; use float32, bfloat16 or float16")
    check_device(cfg.device)
    folder = os.path.dirname(os.path.abspath(cfg.out))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--out folder {folder} does not exist")
    if os.path.isdir(cfg.out) or not os.access(folder, os.W_OK):
        raise PermissionError(f"cannot write --out {cfg.out}")


def run(cfg: Config):
    check_config(cfg)
    rows = read_prompts(cfg.prompts)
    ids, prompts = [r["id"] for r in rows], [r["prompt"] for r in rows]
    if len(set(map(str, ids))) != len(ids):
        raise ValueError(f"{cfg.prompts}: duplicate ids")
    # a folder as is, or a hub id ORG/NAME -> its cached snapshot, as transformers
    path = resolve_model(cfg.model)
    tok = load_tokenizer(path)       # before the weights: a broken tokenizer fails in a second
    # before any work
    args = ModelArgs.from_hf_config(read_config(path))
    check_vocab(tok, args.vocab_size, path)
    if cfg.max_new_tokens >= args.max_seq_len:
        raise ValueError(f"--max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in "
                         f"the model's context of {args.max_seq_len} tokens")
    model = Transformer.from_pretrained(path, dtype=DTYPES[cfg.dtype], device=cfg.device)
    torch.set_num_threads(pick_threads(cfg.threads, model.num_params()))
    outs = generate(model, tok, prompts, num_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, ids=ids,
                    rows=cfg.rows, progress=True, compile=cfg.compile)
    with open(cfg.out, "w") as f:
        for i, p, o in zip(ids, prompts, outs):
            f.write(json.dumps({"id": i, "prompt": p, "samples": [s["text"] for s in o],
                                "finish_reasons": [s["finish_reason"] for s in o],
                                "stop_tokens": [s["stop_token"] for s in o]}) + "\n")
    print(f"wrote {len(outs)} prompts x {cfg.num_samples} samples to {cfg.out}")


if __name__ == "__main__":
    cfg = cli(Config)
    try:
        run(cfg) if cfg.model else demo(cfg.compile)
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")

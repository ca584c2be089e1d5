"""Batched, KV-cached sampling: K samples per prompt, prefilled once (Alg. 2, line 2: K = 5, T = 0.7, top-p 0.95).

    python sample.py                                  # CPU demo: cached greedy == naive greedy, tokens/s
    python sample.py --model DIR|ORG/NAME --prompts IN.jsonl --out OUT.jsonl --num_samples 5 --max_new_tokens 512 \
        --temperature 0.7 --top_p 0.95 --seed 0      # add --device cuda --dtype bfloat16 --compile true on a GPU
    python bench/bench_eos.py                         # EOS on: dropping finished rows vs lock-step vs transformers
    from sample import generate, encode_prompt
    outs = generate(model, tok, ["Hi", [{"role": "user", "content": "Hi"}]], num_samples=5)
    outs[0][k] == {"tokens": [...], "text": "...", "finish_reason": "stop", "stop_token": 151645}

IN.jsonl lines: {"id"?: any, "prompt": str | [{"role", "content"}, ...]}; OUT.jsonl lines:
{"id", "prompt", "samples": [text] * K, "finish_reasons": ["stop" | "length"] * K, "stop_tokens": [id | null] * K}
(the stop id that ended each sample; null when it ran out of tokens). Every flag, the device and the --out
folder are checked before the model loads.

How a batch runs: B prompts are LEFT-padded to T0 tokens and prefilled once; each prompt's keys/values are
written into K consecutive cache rows, so N = B * K rows then decode together (model.decode), all writing
cache slot T0 + t at step t. Rows that emitted a stop id are dropped from the decode batch: once >= 25% of the
live rows have finished, model.keep_rows gathers every per-row cache tensor (k, v, key_valid, next_pos) in
place onto its first n rows and views it as (n, ...); `live` maps cache row -> output row. A batch then costs
about the sum of its samples' lengths instead of N times its longest one (bench/bench_eos.py: 2.6x on geometric
lengths); generate(compact=False) keeps the old lock-step for comparison. Sampling is exact top-p by inverse
CDF with three uniforms per (output row, step), drawn from a torch.Generator seeded by hash(seed, prompt id,
sample index): a sample does not depend on which other prompts share its batch, on batch_size, on prompt order,
or on when its batch was compacted (the uniforms follow the row, and greedy stays equal to naive recomputation).

Departures:
 1. top-p keeps the tokens whose higher-probability mass is < top_p (the smallest set reaching top_p), as the
    paper's samplers do; ties at the boundary may resolve differently from transformers' warper.
 2. Finished rows keep decoding (their tokens discarded) until the next compaction, which waits for 25% of the
    live rows to finish (on CUDA it is checked every 8 steps, a host sync) to amortise the copy. Under --compile
    the batch only halves (finished rows pad it to N / 2^j) so the compiled step sees few shapes.
 3. CPU draws top-p samples by rejection (no vocabulary sort), CUDA by sorting: both exact, but the same seed
    gives different samples on the two devices (as does any change of dtype or hardware). sample_tokens(sort=True)
    forces the CUDA path on CPU (the tests check both against the exact nucleus distribution).
 4. Prompt ids default to the prompt's index in the list; the CLI uses the JSONL "id" (default: line number).
"""
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from cli import cli
from model import ModelArgs, Transformer
from model_io import load_tokenizer, pick_threads, resolve_model

CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


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
    batch_size: int = 16          # prompts per batch (rows = batch_size * num_samples)
    dtype: str = "float32"        # float32 | bfloat16 | float16
    device: str = "cpu"
    compile: bool = False         # torch.compile the decode step (CUDA graphs on a GPU, inductor on CPU)
    threads: str = "auto"         # CPU threads: auto = what the model size warrants (model_io.pick_threads) | N


def encode_prompt(tokenizer, prompt) -> list:
    """Prompt -> token ids. str: tokenized as-is (tokenizer's default special tokens); list of {"role",
    "content"} messages: the tokenizer's chat template with the generation prompt; list of ints: taken as ids."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
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


def sample_tokens(logits, u, temperature, top_p, sort=None):
    """logits (N, V) float32, u (N, 3) uniforms in [0, 1) -> (N,) token ids; temperature 0 = argmax.
    Top-p nucleus = the tokens whose more-probable mass is < top_p. On CPU, sorting the vocabulary every step
    dominates decode time, so we draw 2 candidates from the full softmax by inverse CDF and take the first that
    lies in the nucleus (rejection sampling: exact, accepted with probability >= top_p); rows where both miss
    fall back to the sorted nucleus with the third uniform. On CUDA the sort is cheap and sync-free: always sort.
    sort: None = sort on CUDA only; True / False force either path (tests run the CUDA path on CPU)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # (N, V)
    if top_p < 1 and (probs.is_cuda if sort is None else sort):
        return _sample_sorted(probs, u[:, -1], top_p)
    cand = _inverse_cdf(probs, u[:, :2])  # (N, 2) draws from the full distribution
    tok = cand[:, 0]
    if top_p >= 1:
        return tok
    miss = (~_in_nucleus(probs, tok, top_p)).nonzero()[:, 0]  # rows whose first candidate is rejected
    if len(miss):
        p, second = probs[miss], cand[miss, 1]
        tok[miss] = torch.where(_in_nucleus(p, second, top_p), second, _sample_sorted(p, u[miss, 2], top_p))
    return tok


def _in_nucleus(probs, tok, top_p):  # (N, V), (N,) -> (N,) bool: mass of strictly more likely tokens < top_p
    p_tok = probs.gather(1, tok[:, None])  # (N, 1)
    return torch.where(probs > p_tok, probs, 0).sum(-1) < top_p


def _inverse_cdf(probs, u):  # probs (N, V) (unnormalised ok), u (N, M) -> (N, M) ids with P(id) = prob / sum
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[1] - 1)


def _sample_sorted(probs, u, top_p):  # probs (N, V), u (N,) -> (N,): inverse CDF over the sorted nucleus
    probs, order = probs.sort(dim=-1, descending=True)
    probs = probs * ((probs.cumsum(-1) - probs) < top_p)  # keep while the mass above is < top_p
    return order.gather(1, _inverse_cdf(probs, u[:, None]))[:, 0]


def left_pad(prompts, pad_id=0):
    """list of token-id lists -> idx (B, T0), mask (B, T0) with the padding on the left."""
    T0 = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T0), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T0), dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, T0 - len(p):], mask[b, T0 - len(p):] = torch.tensor(p), 1
    return idx, mask


COMPACT_AT = 0.25  # compact the KV cache once this fraction of the live rows has finished (departure 2)


@torch.no_grad()
def _generate_batch(model, prompts, seeds, K, max_new_tokens, temperature, top_p, stops, step, static, compact):
    """B prompts (token lists) -> B * K rows of raw tokens (N, steps) as a list of lists (stop ids included;
    a row dropped from the batch holds -1 after its stop id)."""
    dev = model.embed_tokens.weight.device
    idx, mask = left_pad(prompts)
    T0, N = idx.shape[1], len(prompts) * K
    S = T0 + max_new_tokens
    if static:  # round the cache length so compiled shapes repeat across batches
        S = -(-S // 256) * 256
    model.setup_cache(N, S)
    logits = model.prefill(idx.to(dev), mask.to(dev)).repeat_interleave(K, 0)  # (N, V): prompt b -> rows b*K..
    u = torch.stack([torch.rand(max_new_tokens, 3, generator=torch.Generator().manual_seed(s)) for s in seeds])
    u = u.to(dev)  # (N, max_new_tokens, 3): three uniforms per (output row, step), see sample_tokens
    out = torch.full((N, max_new_tokens), -1, dtype=torch.long, device=dev)
    stop_t = torch.tensor(stops, dtype=torch.long, device=dev)
    live = torch.arange(N, device=dev)  # (n,): cache row r holds output row live[r]
    done = torch.zeros(N, dtype=torch.bool, device=dev)  # (n,) per cache row
    slots = torch.arange(T0, T0 + max_new_tokens, device=dev)  # decode step t writes cache slot T0 + t
    for t in range(max_new_tokens):
        tok = sample_tokens(logits, u[live, t], temperature, top_p)  # (n,): a row's uniforms follow it
        out[live, t] = tok
        if len(stops):
            done |= torch.isin(tok, stop_t)
        if t == max_new_tokens - 1:
            break
        if len(stops) and (dev.type == "cpu" or t % 8 == 7):  # on GPU this host sync runs every 8 steps
            finished = int(done.sum())
            if finished == len(live):
                break
            if compact and finished >= COMPACT_AT * len(live):
                keep = _rows_to_keep(done, static)
                if len(keep) < len(live):
                    model.keep_rows(keep, T0 + t)  # slots [0, T0 + t) written
                    live, done, tok = live[keep], done[keep], tok[keep]
        logits = step(tok, slots[t:t + 1], S if static else T0 + t + 1)  # (n, V)
    return out[:, :t + 1].tolist()


def _rows_to_keep(done, static):
    """done (n,) bool -> sorted cache rows to keep: the unfinished ones. static (compiled step): padded with
    finished rows up to n / 2^j so the compiled step sees at most log2(N) + 1 shapes."""
    keep = (~done).nonzero()[:, 0]
    if static:
        n = len(done)
        while n // 2 >= len(keep):
            n //= 2
        keep = torch.cat([keep, done.nonzero()[:, 0][:n - len(keep)]]).sort().values
    return keep


def check_sampling(num_samples, max_new_tokens, temperature, top_p, batch_size):
    """One-line ValueError for an impossible sampling setting (generate() and the CLI, before any work)."""
    for name, v in [("num_samples", num_samples), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)]:
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def generate(model, tokenizer, prompts, *, num_samples=1, max_new_tokens=128, temperature=0.7, top_p=0.95,
             seed=0, ids=None, stop_ids=None, batch_size=16, progress=False, compile=False, compact=True):
    """For each prompt, K = num_samples dicts {"tokens" (response, stop token excluded), "text",
    "finish_reason": "stop" | "length", "stop_token": the stop id that ended it, or None}. ids: per-prompt ids for
    the per-(id, sample, seed) RNG (default: index). stop_ids: None = default_stop_ids; [] = never stop.
    batch_size: prompts per batch (N = batch_size * K rows). compact=False: finished rows decode until the whole
    batch stopped (the lock-step baseline; same samples, slower)."""
    ids = list(range(len(prompts))) if ids is None else list(ids)
    if len(ids) != len(prompts):
        raise ValueError(f"{len(ids)} ids for {len(prompts)} prompts")
    check_sampling(num_samples, max_new_tokens, temperature, top_p, batch_size)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    ctx = model.args.max_seq_len
    for i, e in enumerate(encoded):
        if len(e) >= ctx:
            raise ValueError(f"prompt {ids[i]!r} has {len(e)} tokens; the model's context is {ctx} tokens")
    stops = default_stop_ids(tokenizer, model) if stop_ids is None else sorted(set(stop_ids))
    step = model.decode
    if compile:  # CUDA graphs over the static-shape decode step; kept on the model so later calls reuse it
        if getattr(model, "compiled_decode", None) is None:
            mode = "reduce-overhead" if model.embed_tokens.weight.is_cuda else "default"  # CUDA graphs need CUDA
            model.compiled_decode = torch.compile(model.decode, mode=mode, fullgraph=True)
        step = model.compiled_decode
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    results = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc="sampling", unit="prompt", disable=not progress)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        seeds = [row_seed(seed, ids[i], k) for i in chunk for k in range(num_samples)]
        rows = _generate_batch(model, [encoded[i] for i in chunk], seeds, num_samples, max_new_tokens,
                               temperature, top_p, stops, step, compile, compact)
        for b, i in enumerate(chunk):
            results[i] = [_finish(r, tokenizer, set(stops), ctx - len(encoded[i]))
                          for r in rows[b * num_samples:(b + 1) * num_samples]]
        bar.update(len(chunk))
    bar.close()
    if not compile:  # the compiled step's CUDA graphs keep pointing at the cache buffers: keep them then
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
    """Test oracle: greedy decoding by recomputing the whole left-padded batch every step, no cache."""
    idx, mask = left_pad(prompts)
    for _ in range(max_new_tokens):
        tok = model(idx, attention_mask=mask)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        idx, mask = torch.cat([idx, tok], 1), torch.cat([mask, torch.ones_like(tok)], 1)
    return idx[:, -max_new_tokens:].tolist()


def read_prompts(path):
    """Prompts JSONL -> rows: each line's object with "id" (default: the line number) and "line" added. A line needs
    "prompt": a non-empty string or a list of {"role": str, "content": str} messages; a bad line is a one-line
    ValueError naming path:line. train.py reads its prompts with this too."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {path} not found")
    rows = []
    with open(path, "rb") as f:
        raw = f.read()
    try:                                                   # a non-UTF-8 file: one line naming it (CLI and train.py)
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    for n, line in enumerate(text.split("\n"), 1):   # as iterating the file would number them
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        p = row.get("prompt") if isinstance(row, dict) else None
        if p is None:
            raise ValueError(f"{path}:{n}: missing 'prompt'")
        if not isinstance(p, str) and not (isinstance(p, list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in p)):
            raise ValueError(f"{path}:{n}: 'prompt' must be a string or a list of "
                             "{\"role\": str, \"content\": str} messages")
        if not (p.strip() if isinstance(p, str) else any(m["content"].strip() for m in p)):
            raise ValueError(f"{path}:{n}: empty 'prompt'")
        rows.append({**row, "id": row.get("id", n), "line": n})
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device(name) -> torch.device:
    """--device string -> torch.device, or a one-line ValueError when it is malformed or not on this machine."""
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
    """Every flag, the device and the --out folder, before the model loads or anything is generated."""
    if not cfg.prompts or not cfg.out:
        raise ValueError("--prompts IN.jsonl and --out OUT.jsonl are required with --model")
    check_sampling(cfg.num_samples, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size)
    if cfg.dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {cfg.dtype!r}; use float32, bfloat16 or float16")
    check_device(cfg.device)
    folder = os.path.dirname(os.path.abspath(cfg.out))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--out folder {folder} does not exist")
    if os.path.isdir(cfg.out) or not os.access(folder, os.W_OK):
        raise PermissionError(f"cannot write --out {cfg.out}")


def load_prompts(path, tok, max_prompt_tokens):
    """train.py's prompts: read_prompts' rows -> ([{"id": str, "prompt", "gold", "prompt_tokens"}], n_skipped). Checks
    the optional gold response (a string) and unique ids; prompts longer than max_prompt_tokens are skipped and
    counted (train.py's departure 1)."""
    rows, skipped, seen = [], 0, set()
    for r in read_prompts(path):
        where, rid = f"{path}:{r['line']}", str(r["id"])
        if not (r.get("gold") is None or isinstance(r["gold"], str)):
            raise ValueError(f"{where}: 'gold' must be a string")
        if rid in seen:
            raise ValueError(f"{where}: duplicate id {rid!r}")
        seen.add(rid)
        ids = encode_prompt(tok, r["prompt"])
        if len(ids) > max_prompt_tokens:                        # departure 1
            skipped += 1
            continue
        rows.append({"id": rid, "prompt": r["prompt"], "gold": r.get("gold") or None, "prompt_tokens": ids})
    return rows, skipped


def run(cfg: Config):
    check_config(cfg)
    rows = read_prompts(cfg.prompts)
    ids, prompts = [r["id"] for r in rows], [r["prompt"] for r in rows]
    if len(set(map(str, ids))) != len(ids):
        raise ValueError(f"{cfg.prompts}: duplicate ids")
    path = resolve_model(cfg.model)  # a folder as is, or a hub id ORG/NAME -> its cached snapshot, as transformers
    tok = load_tokenizer(path)       # before the weights: a broken tokenizer fails in a second
    model = Transformer.from_pretrained(path, dtype=DTYPES[cfg.dtype], device=cfg.device)
    torch.set_num_threads(pick_threads(cfg.threads, model.num_params()))
    outs = generate(model, tok, prompts, num_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, ids=ids,
                    batch_size=cfg.batch_size, progress=True, compile=cfg.compile)
    with open(cfg.out, "w") as f:
        for i, p, o in zip(ids, prompts, outs):
            f.write(json.dumps({"id": i, "prompt": p, "samples": [s["text"] for s in o],
                                "finish_reasons": [s["finish_reason"] for s in o],
                                "stop_tokens": [s["stop_token"] for s in o]}) + "\n")
    print(f"wrote {len(outs)} prompts x {cfg.num_samples} samples to {cfg.out}")


def demo(cfg: Config):
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
    outs = generate(model, None, prompts, num_samples=4, max_new_tokens=64, stop_ids=[], compile=cfg.compile)
    dt = time.perf_counter() - t0
    n = sum(len(s["tokens"]) for o in outs for s in o)
    print(f"sampling 8 prompts x 4 samples x 64 tokens ({model.num_params() / 1e6:.2f}M params, CPU): "
          f"{n} tokens in {dt:.2f}s = {n / dt:.0f} tokens/s")
    if not same:
        sys.exit("error: cached greedy differs from naive recomputation")


if __name__ == "__main__":
    cfg = cli(Config)
    try:
        run(cfg) if cfg.model else demo(cfg)
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")

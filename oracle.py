"""oracle.py -- preference judges P(y > y' | x) for DNO: cached, budgeted, fault-tolerant.

Usage:
  python oracle.py                                   # offline demo: synthetic judges on built-in items
  python oracle.py --judge synthetic --synthetic cyclic --samples s.jsonl --out j.jsonl
  OPENAI_API_KEY=sk-... python oracle.py --judge rubric --model gpt-4-turbo --samples s.jsonl --out j.jsonl --max_usd 5
  OPENAI_API_KEY=x python oracle.py --judge pairwise --base_url http://127.0.0.1:8080/v1 --model tiny \
      --extra_body '{"repeat_penalty": 1.0}' --samples s.jsonl --out j.jsonl     # llama.cpp / vLLM / Ollama
  python oracle.py --judge local --local_model DIR --samples s.jsonl --out j.jsonl   # HF-layout model, no API
Input lines {"id", "prompt", "samples": [...], "gold"?}; the gold response (if any) is the last candidate.
Output lines {"id", "prompt", "candidates", "gold_index", "ok", "error", "scores", "score_kind" ("rubric": 0..6
points | "winrate": row means of P), "P", "disagreement", "cached",
"truncated", "max_judge_tokens", "rationale" (rubric)}; a summary line follows on stdout (calls, retries, cache
hits, failures by kind, order disagreement, tokens, dollars). Cache: --cache JSONL, one line per answered request
(failures are never cached, so a rerun re-asks exactly them). The API key is read from $OPENAI_API_KEY (the env
var named by --api_key_env) and never written anywhere; a server that echoes it gets it masked as ***.
The HTTP client (the `openai` package), retries, budget ledger and cache live in chat_api.py.

Judges: "rubric" (the paper's batched prompting: all K+1 candidates in one call, a short justification and
an additive score out of 6 each), "pairwise" (one verdict token A/B, soft P from its top log-probs, both
orders averaged), "local" (the pairwise prompt on a local model.py Transformer), "synthetic" (SYNTHETIC).

Departures from the paper (numbered):
1. The rubric wording is our own paraphrase of the additive 6-point rubric; the paper's judge is GPT-4-Turbo,
   ours is any OpenAI-compatible endpoint.
2. The pairwise and local judges are not in the paper (which ranks by rubric scores only); they give a soft
   P(y > y' | x) in [0, 1], the quantity Alg. 1 is written in, judged in both orders to cancel position bias.
3. For the rubric judge P[i][j] is 1/0.5/0 from comparing scores; "scores" of pairwise judges are win-rates.
4. Candidates longer than max_judge_tokens are truncated before judging (listed in "truncated").
5. A failed judgment is explicit (ok=False, None entries) and is never turned into a winner or a zero.
"""
import hashlib, json, math, os, re, sys, threading, time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass

from chat_api import PRICES, BudgetExceeded, Cache, Ledger, call, count_tokens, get_encoder, pool, truncate
from cli import cli

TEMPLATE_VERSION = "dno-oracle-v1"  # bump when any template below changes: it is part of every cache key
SYSTEM = "You are a careful and impartial judge of answers written by AI assistants."
RUBRIC_TEMPLATE = """Below is a user prompt followed by {n} candidate responses. Judge each response on its own with
this additive 6-point rubric, adding one point per satisfied criterion:
- The response is relevant to the prompt and gives some useful information.
- It addresses a substantial part of the request, even if incomplete.
- It answers the basic request in a useful way.
- It is clearly written from an assistant's point of view, well organized and complete.
- It is tailored to the request, concise and free of irrelevant content.
- It is an expert-quality answer: accurate, insightful, nothing to add or remove.

[Prompt]
{prompt}

{candidates}

For every candidate, in order, write exactly two lines:
Candidate <number>: <one-sentence justification>
Score: <integer from 0 to 6>"""
CANDIDATE_TEMPLATE = "[Candidate {i}]\n{text}\n[End of candidate {i}]"
PAIRWISE_TEMPLATE = """Which response answers the user prompt better? Consider helpfulness, correctness and clarity.

[Prompt]
{prompt}

[Response A]
{a}

[Response B]
{b}

Reply with one letter only: A or B."""
@dataclass
class Config:
    judge: str = "rubric"          # rubric | pairwise | local | synthetic
    synthetic: str = "length"      # name in SYNTHETIC when judge == "synthetic"
    samples: str = ""              # CLI input: samples JSONL
    out: str = "judgments.jsonl"   # CLI output: judgments JSONL
    base_url: str = ""             # OpenAI-compatible endpoint; "" -> $OPENAI_BASE_URL or api.openai.com
    model: str = "gpt-4-turbo"     # judge model name sent to the endpoint
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the env var holding the key (the key itself is never stored)
    local_model: str = ""          # HF-layout model dir for judge == "local" ("" -> --model)
    local_batch_size: int = 8      # prompts per forward pass of the local judge
    concurrency: int = 8           # requests in flight
    retries: int = 4               # retries per request on 429 / 5xx / timeouts / malformed replies
    backoff: float = 0.5           # base seconds of exponential backoff (x2 per retry, with jitter)
    timeout: float = 60.0          # seconds per request
    max_judge_tokens: int = 1024   # candidates longer than this (tiktoken count) are truncated before judging
    max_new_tokens: int = 1024     # cap on the rubric judge's own answer
    temperature: float = 0.0       # judge decoding temperature
    top_logprobs: int = 5          # alternatives read at the verdict token (pairwise)
    extra_body: str = ""           # JSON merged into each request, e.g. '{"repeat_penalty": 1.0}' for llama.cpp
    encoding: str = ""             # tiktoken encoding name or local .tiktoken file; "" -> by model, else cl100k_base
    cache: str = "judge_cache.jsonl"  # append-only JSONL cache; "" disables
    max_usd: float = 0.0           # hard budget in dollars (0 = none)
    max_calls: int = 0             # hard budget in requests sent (0 = none)
    prices: str = ""               # JSON price overrides {"model": [usd_in_per_1M, usd_out_per_1M]}
    seed: int = 0                  # seed of the retry jitter


class OracleError(ValueError):
    """A user/setup mistake with a one-line message (CLIs print it and exit)."""


# ----------------------------------------------------------------------------- synthetic judges
# Deterministic functions of the texts with the fn(prompt, candidates) signature; all satisfy
# P(a > b) + P(b > a) = 1 exactly, as the paper's P must.
def length_judge(prompt, candidates):
    """Longer is better, softly: P(a > b) = sigmoid((len a - len b) / 20 chars)."""
    L = [len(c) for c in candidates]
    return {"P": [[0.5 if i == j else 1 / (1 + math.exp(-(a - b) / 20)) for j, b in enumerate(L)]
                  for i, a in enumerate(L)]}


def overlap_judge(prompt, candidates):
    """Rubric-style 0..6 score: distinct prompt words the candidate reuses (a transitive, scalar judge)."""
    words = set(str(prompt).lower().split())
    return {"scores": [float(min(6, len(words & set(c.lower().split())))) for c in candidates]}


def cyclic_judge(prompt, candidates):
    """Intransitive rock-paper-scissors on word count mod 3: class c beats class (c - 1) mod 3, so
    1 word > 3 words > 2 words > 1 word -- a preference no scalar reward (Bradley-Terry) can express."""
    c = [len(t.split()) % 3 for t in candidates]
    return {"P": [[1.0 if (a - b) % 3 == 1 else 0.0 if (b - a) % 3 == 1 else 0.5 for b in c] for a in c]}


SYNTHETIC = {"length": length_judge, "overlap": overlap_judge, "cyclic": cyclic_judge}


# ----------------------------------------------------------------------------- parsing
def parse_scores(text, n):
    """Rubric scores from a judge's answer -> n floats in [0, 6] or None (unparsable = failure, not zero).
    Accepts 'Candidate 2: ... Score: 5', '**Candidate 2** ... 5/6', 'Score 2: 5', 'Score for candidate 2: 5'."""
    num = r"(\d+(?:\.\d+)?)"
    head = re.compile(r"^[\s#*>\-\[]*(?:candidate|response)\s*#?\s*(\d+)\b", re.I | re.M)
    score = re.compile(r"score\s*(?:\(\s*0\s*-\s*6\s*\))?\s*[:=]?\s*\**\s*" + num  # "Score: 5", "score (0-6) = 5"
                       + r"|" + num + r"\s*(?:/|out of)\s*6", re.I)                # "5/6", "5 out of 6"
    found = {}
    marks = list(head.finditer(text))
    for m, nxt in zip(marks, marks[1:] + [None]):  # one section per candidate header
        s = score.search(text, m.end(), nxt.start() if nxt else len(text))
        if s:
            found.setdefault(int(m.group(1)), []).append(float(s.group(1) or s.group(2)))
    for m in re.finditer(r"score\s*(?:for\s*(?:candidate|response)\s*)?#?(\d+)\s*[:=]\s*" + num, text, re.I):
        found.setdefault(int(m.group(1)), []).append(float(m.group(2)))
    vals = [set(found.get(i, [])) for i in range(1, n + 1)]  # conflicting scores for one candidate -> unparsable
    return [v.pop() if len(v) == 1 and 0 <= min(v) <= 6 else None for v in vals]


def verdict_prob(top):
    """Soft P(first response wins) from [(token, logprob), ...] at the verdict position: mass on 'A' over
    mass on 'A' or 'B' (leading spaces / SentencePiece marks ignored). None when neither letter is listed."""
    mass = {"A": 0.0, "B": 0.0}
    for tok, lp in top:
        t = tok.replace("\u2581", " ").strip()
        if t in mass:
            mass[t] += math.exp(lp)
    tot = mass["A"] + mass["B"]
    return mass["A"] / tot if tot > 0 else None


def prompt_text(prompt):
    """A prompt is a string or a list of chat messages; the judge sees it as text."""
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def encoder_for(cfg):
    return get_encoder(cfg.encoding or ("o200k_base" if cfg.model.startswith(("gpt-4o", "gpt-4.1")) else "cl100k_base"))


# ----------------------------------------------------------------------------- the judges' calls
def make_client(cfg):
    """-> (client, key): the endpoint's pool of keep-alive connections (chat_api.py), and the key, read from the
    environment (never from a flag or a file)."""
    key = os.environ.get(cfg.api_key_env, "")
    if not key:
        raise OracleError(f"missing API key: set ${cfg.api_key_env} (any non-empty value for a local server)")
    url = cfg.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
    if not url.startswith(("http://", "https://")):
        raise OracleError(f"--base_url must start with http:// or https://, got {url!r}")
    return pool(url, cfg.timeout, key), key


def read_reply(data, unit):
    """Chat-completion JSON -> cache value; raises on a malformed reply (retried), returns 'fail' when unparsable."""
    ch = data["choices"][0]
    if unit["kind"] == "rubric":
        text = ch["message"]["content"]
        scores = parse_scores(text, unit["n"])
        bad = [i for i, s in enumerate(scores) if s is None]
        return {"scores": scores, "raw": text, **({"fail": "parse", "error": f"unparsable scores for candidates {bad}"}
                                                  if bad else {})}
    pos = ch["logprobs"]["content"][0]  # the verdict token position
    top = {t["token"]: t["logprob"] for t in pos.get("top_logprobs") or []}
    p = verdict_prob(list({pos["token"]: pos["logprob"], **top}.items()))  # the sampled token may be missing from top
    if p is None:
        return {"fail": "no_verdict", "error": f"no A/B among the top log-probs (got {pos['token']!r})"}
    return {"p": p, "raw": pos["token"]}


def run_local(units, cfg, ledger, done):
    """Local judge: the pairwise prompt through a model.py Transformer; P(A) read from the next-token
    log-softmax over the verdict tokens, batches left-padded."""
    import torch
    from transformers import AutoTokenizer
    from model import Transformer
    path = cfg.local_model or cfg.model
    if not os.path.isdir(path):
        raise OracleError(f"local judge model {path!r} is not a directory (--local_model)")
    tok, model = AutoTokenizer.from_pretrained(path), Transformer.from_pretrained(path).eval()
    letters = {v: {ids[0] for ids in (tok.encode(s, add_special_tokens=False) for s in (v, " " + v)) if len(ids) == 1}
               for v in "AB"}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for s in range(0, len(units), cfg.local_batch_size):
        chunk, rows = units[s:s + cfg.local_batch_size], []
        for u in chunk:
            ledger.spend(0, 0)
            text = (tok.apply_chat_template(u["messages"], tokenize=False, add_generation_prompt=True)
                    if tok.chat_template else u["messages"][-1]["content"])
            rows.append(tok(text, add_special_tokens=False)["input_ids"])
        T = max(map(len, rows))
        idx = torch.tensor([[pad] * (T - len(r)) + r for r in rows])  # (B, T) left-padded
        mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])  # (B, T)
        with torch.no_grad():
            logits = model(idx, attention_mask=mask) if (mask == 0).any() else model(idx)  # (B, T, V)
        logp = torch.log_softmax(logits[:, -1].float(), dim=-1)  # (B, V)
        for u, lp, r in zip(chunk, logp, rows):
            p = verdict_prob([(v, lp[i].item()) for v in "AB" for i in letters[v]])
            ledger.settle(0, len(r), 0)
            done(u, {"p": p} if p is not None else {"fail": "no_verdict", "error": "no verdict tokens in vocab"})


# ----------------------------------------------------------------------------- judging items
def plan_item(item, cfg, fn, enc, judge_id):
    """-> (units, truncated): the requests one item needs (1 for rubric/fn, n(n-1) ordered pairs otherwise),
    each keyed by a content hash of (judge, template version, prompt, ordered candidates, decoding)."""
    prompt, cands = item["prompt"], list(item["candidates"])
    h = lambda *parts: hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    if fn is not None:
        return [{"key": h(judge_id, TEMPLATE_VERSION, prompt, cands), "kind": "fn", "item": item}], []
    cut = [truncate(enc, c, cfg.max_judge_tokens) for c in cands]
    cands, truncated = [c for c, _ in cut], [i for i, (_, was) in enumerate(cut) if was]
    text, dec = prompt_text(prompt), {"temperature": cfg.temperature, "extra_body": cfg.extra_body}

    def unit(kind, content, order, max_tokens):
        dec_u = {**dec, "max_tokens": max_tokens, **({"top_logprobs": cfg.top_logprobs} if kind == "verdict" else {})}
        return {"key": h(judge_id, TEMPLATE_VERSION, kind, text, [cands[k] for k in order], dec_u), "kind": kind,
                "pair": tuple(order), "n": len(cands), "max_tokens": max_tokens,
                "n_in": count_tokens(enc, SYSTEM + content) + 10,  # + chat-format overhead
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]}
    if cfg.judge == "rubric":
        shown = "\n\n".join(CANDIDATE_TEMPLATE.format(i=k + 1, text=c) for k, c in enumerate(cands))
        content = RUBRIC_TEMPLATE.format(n=len(cands), prompt=text, candidates=shown)
        return [unit("rubric", content, range(len(cands)), cfg.max_new_tokens)], truncated
    return [unit("verdict", PAIRWISE_TEMPLATE.format(prompt=text, a=cands[a], b=cands[b]), (a, b), 1)
            for a in range(len(cands)) for b in range(len(cands)) if a != b], truncated


def assemble(item, units, values, truncated, cfg):
    """Cache values of one item's units -> the contract's result dict (P[i][j] = P(cand i > cand j))."""
    n, vals = len(item["candidates"]), [values.get(u["key"]) for u in units]
    res = {"id": item["id"], "ok": False, "error": None, "scores": None, "P": None, "disagreement": None,
           "cached": all(v is not None and v.get("_cached") for v in vals),
           "truncated": truncated, "max_judge_tokens": cfg.max_judge_tokens}
    if any(v is None for v in vals):
        return {**res, "error": "not judged: budget exhausted"}
    first, fails = vals[0], [v for v in vals if "fail" in v]
    if "scores" in first or units[0]["kind"] == "rubric":  # P[i][j] from comparing scores (departure 3)
        s = first.get("scores")
        P = None if s is None else [[0.5 if i == j else None if s[i] is None or s[j] is None else
                                     0.5 + 0.5 * ((s[i] > s[j]) - (s[i] < s[j])) for j in range(n)] for i in range(n)]
        res.update(scores=s, score_kind="rubric", P=P, rationale=first.get("raw"))
    else:
        if units[0]["kind"] == "fn":
            P = first["P"]
        else:  # both orders of each pair, averaged: P(i > j) = (p(i first wins) + 1 - p(j first wins)) / 2
            p = {u["pair"]: v.get("p") for u, v in zip(units, vals)}
            P = [[0.5 if i == j else None if p[i, j] is None or p[j, i] is None else (p[i, j] + 1 - p[j, i]) / 2
                  for j in range(n)] for i in range(n)]
            both = [(p[i, j], p[j, i]) for i in range(n) for j in range(i + 1, n) if None not in (p[i, j], p[j, i])]
            # the two orders disagree when both say "first wins" or both say "second wins"
            res["disagreement"] = sum((a - .5) * (b - .5) > 0 for a, b in both) / len(both) if both else None
        known = [[x for j, x in enumerate(row) if j != i and x is not None] for i, row in enumerate(P)]
        res.update(P=P, scores=[sum(k) / len(k) if k else None for k in known], score_kind="winrate")
    res["ok"] = not fails and P is not None and all(x is not None for row in P for x in row)
    if fails:
        more = f" (+{len(fails) - 1} more)" if len(fails) > 1 else ""
        res["error"] = f"{fails[0]['fail']}: {fails[0]['error']}{more}"
    return res


def check_inputs(items, cfg, fn):
    """-> the synthetic fn to use (or None); a one-line OracleError for any user mistake."""
    if fn is None and cfg.judge == "synthetic":
        if cfg.synthetic not in SYNTHETIC:
            raise OracleError(f"unknown --synthetic {cfg.synthetic!r}; choose from {sorted(SYNTHETIC)}")
        fn = SYNTHETIC[cfg.synthetic]
    if fn is None and cfg.judge not in ("rubric", "pairwise", "local"):
        raise OracleError(f"unknown --judge {cfg.judge!r}; choose rubric, pairwise, local or synthetic")
    for it in items:
        if not (isinstance(it, dict) and "id" in it and "prompt" in it and isinstance(it.get("candidates"), list)
                and all(isinstance(c, str) for c in it["candidates"])):
            raise OracleError(f"bad item {str(it)[:80]!r}: need 'id', 'prompt' and 'candidates' (a list of strings)")
    for flag, text in (("extra_body", cfg.extra_body), ("prices", cfg.prices)):
        try:
            obj = json.loads(text or "{}")
            assert isinstance(obj, dict) and (flag == "extra_body" or all(len(v) == 2 for v in obj.values()))
        except (ValueError, AssertionError, TypeError):
            raise OracleError(f"--{flag} must be a JSON object (--prices: {{\"model\": [in, out]}}), got {text!r}")
    return fn


def run_fn(pending, fn, ledger, done):
    """A synthetic judge: one call per item, its answer checked for shape."""
    for u in pending:
        ledger.spend(0, 0)
        n, v = len(u["item"]["candidates"]), fn(u["item"]["prompt"], list(u["item"]["candidates"]))
        if not isinstance(v, dict) or not (len(v.get("scores") or []) == n or len(v.get("P") or []) == n):
            raise OracleError(f"judge {fn.__name__} returned {str(v)[:60]}; want {{'scores': [n]}} or {{'P': n x n}}")
        done(u, v)


def run_api(pending, cfg, ledger, done):
    """Bounded concurrency: cfg.concurrency threads; `done` caches each answer as soon as it lands (in the
    worker), so an interrupt or a budget stop loses at most the requests in flight."""
    (client, key), extra = make_client(cfg), json.loads(cfg.extra_body or "{}")

    def work(u):  # one judge request through chat_api.call: retries, budget, key scrubbing
        body = dict(model=cfg.model, messages=u["messages"], max_tokens=u["max_tokens"], temperature=cfg.temperature,
                    **extra)
        if u["kind"] == "verdict":
            body.update(logprobs=True, top_logprobs=max(1, cfg.top_logprobs))  # llama.cpp needs top_logprobs >= 1
        done(u, call(client, key, body, lambda data: read_reply(data, u), ledger, n_in=u["n_in"],
                     max_out=u["max_tokens"], retries=cfg.retries, backoff=cfg.backoff, seed=f"{cfg.seed}:{u['key']}"))
    with ThreadPoolExecutor(max(1, cfg.concurrency)) as ex:
        futs = [ex.submit(work, u) for u in pending]
        try:
            for f in as_completed(futs):
                if not isinstance(f.exception(), BudgetExceeded):
                    f.result()
        finally:
            ex.shutdown(cancel_futures=True)  # on Ctrl-C / an error: send nothing more


def judge_items(items, cfg, *, fn=None, progress=True):
    """Judge each {"id", "prompt", "candidates"} -> (results in the same order, summary). See module docstring."""
    from tqdm import tqdm
    t0, fn = time.time(), check_inputs(items, cfg, fn)
    api = fn is None and cfg.judge != "local"
    price = {**PRICES, **json.loads(cfg.prices or "{}")}.get(cfg.model) if api else (0.0, 0.0)
    if price is None and cfg.max_usd:
        raise OracleError(f"no price known for model {cfg.model!r}: pass --prices '{{\"{cfg.model}\": [in, out]}}'")
    ledger = Ledger(price or (0.0, 0.0), cfg.max_usd, cfg.max_calls)
    enc = encoder_for(cfg) if api else None  # local: ~4 chars/token
    local = f"local:{os.path.abspath(cfg.local_model or cfg.model)}"
    judge_id = f"fn:{fn.__name__}" if fn else cfg.model if api else local
    plans = [plan_item(it, cfg, fn, enc, judge_id) for it in items]
    cache, values, pending, lock = Cache(cfg.cache), {}, {}, threading.Lock()
    for u in (u for units, _ in plans for u in units):
        if u["key"] in cache.data:
            values[u["key"]] = {**cache.data[u["key"]], "_cached": True}
        else:
            pending.setdefault(u["key"], u)
    hits, pending = sum(u["key"] in values for units, _ in plans for u in units), list(pending.values())
    bar = tqdm(total=len(pending), disable=not progress, desc=f"judge[{fn.__name__ if fn else cfg.judge}]", unit="call")

    def done(u, v):  # called by the worker threads too
        if "fail" not in v:  # failures are not cached: a rerun asks again
            cache.put(u["key"], v)
        with lock:
            values[u["key"]] = v
            bar.update(1)
    try:
        if fn is not None:
            run_fn(pending, fn, ledger, done)
        elif cfg.judge == "local":
            run_local(pending, cfg, ledger, done)
        elif pending:
            run_api(pending, cfg, ledger, done)
    except BudgetExceeded:
        pass  # ledger.stopped holds the reason; everything finished so far is already in the cache
    finally:
        bar.close()
        cache.close()
    results = [assemble(it, units, values, tr, cfg) for it, (units, tr) in zip(items, plans)]
    dis = [r["disagreement"] for r in results if r["disagreement"] is not None]
    summary = {"items": len(items), "ok": sum(r["ok"] for r in results), "calls": ledger.calls,
               "retries": ledger.retries, "cache_hits": hits,
               "failures": dict(Counter(v["fail"] for v in values.values() if "fail" in v)),
               "order_disagreement": sum(dis) / len(dis) if dis else None, "tokens_in": ledger.tokens_in,
               "tokens_out": ledger.tokens_out, "usd": round(ledger.usd, 6), "price_known": price is not None,
               "truncated": sum(len(r["truncated"]) for r in results), "seconds": round(time.time() - t0, 3)}
    if ledger.stopped:
        raise BudgetExceeded(f"budget exhausted: {ledger.stopped}; {summary['ok']}/{len(items)} items judged and "
                             "cached (rerun with a larger budget to resume)", results, summary)
    return results, summary


# ----------------------------------------------------------------------------- CLI


def load_samples(path):
    """samples JSONL {"id", "prompt", "samples", "gold"?} -> items with candidates = samples (+ gold last)."""
    items = []
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            try:
                if line.strip():
                    rec = json.loads(line)
                    gold = [rec["gold"]] if rec.get("gold") is not None else []
                    cands = list(rec["samples"]) + gold
                    items.append({"id": str(rec.get("id", ln)), "prompt": rec["prompt"], "candidates": cands,
                                  "gold_index": len(cands) - 1 if gold else None})
            except (ValueError, KeyError, TypeError) as e:
                raise OracleError(f"{path}:{ln}: bad samples line ({type(e).__name__}: {e})")
    return items


def main(argv=None):
    cfg = cli(Config, argv)
    if not cfg.samples:  # demo: the offline synthetic judges on two items, no cache
        items = [{"id": "rps", "prompt": "pick", "candidates": ["rock", "paper cuts", "scissors cut it"]},
                 {"id": "len", "prompt": "say hi", "candidates": ["hi", "hi there, friend", "hello"]}]
        for name, judge in SYNTHETIC.items():
            res, _ = judge_items(items, Config(cache=""), fn=judge, progress=False)
            print(f"{name:8s}", [[[round(x, 2) for x in row] for row in r["P"]] for r in res])
        return
    print(json.dumps({"config": asdict(cfg)}), file=sys.stderr)  # holds the key's env var NAME only
    try:
        items = load_samples(cfg.samples)
        results, s = judge_items(items, cfg)
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
        with open(cfg.out, "w", encoding="utf-8") as f:
            for it, r in zip(items, results):
                f.write(json.dumps({**r, **{k: it[k] for k in ("prompt", "candidates", "gold_index")}}) + "\n")
    except BudgetExceeded as e:
        print(json.dumps({"summary": e.summary}), file=sys.stderr)
        sys.exit(f"error: {e}")
    except (OracleError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"judged {s['items']} items ({s['ok']} ok) | calls {s['calls']} (retries {s['retries']}) | cache hits "
          f"{s['cache_hits']} | failures {s['failures']} | order disagreement {s['order_disagreement']} | tokens "
          f"{s['tokens_in']} in / {s['tokens_out']} out | ${s['usd']:.4f} | {s['seconds']}s")


if __name__ == "__main__":
    main()

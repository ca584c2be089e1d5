"""judging.py: the answering half of the judge loop -- the requests sent (run_api), the local model
asked (run_local), the Python judges called (run_fn) -- and the one registry of Python judges.

    from dnolib import judging
    fn = judging.resolve("demo")            # an alias, or any "module:function"
    judging.length_judge("say hi", ["hi", "hi there"])   # {"P": [[0.5, ...], ...]}

oracle.py plans what to ask (Fig. 3's rubric, the pairwise template) and reads the replies; this
module only carries the questions out and hands each answer to `done`.

The judge contract (a Python judge, --judge module:function): fn(prompt_text, candidates) ->
  {"scores": [n numbers]} or {"P": n x n, P[i][j] = P(i beats j)}; a fn that also takes `messages`,
  `gold`, `id` (or **kwargs) gets messages=<the raw chat list or None>, gold=<gold text or None>,
  id=<the item id>. fn.score_kind declares what its scores mean: "rubric" (the default for
  "scores": points 0..6, the paper's pair rule) or "winrate" (in [0, 1], always so for "P"); a
  score outside the declared range is refused in one line. The cache knows a Python judge by its
  module and a hash of the module's source, so an edited judge is asked again.
"""
import hashlib
import importlib
import inspect
import json
import math
import sys
import threading

import numpy as np

from dnolib.chat_api import Cache, JudgeUnavailable, call, run_pool
from dnolib.ledger import PRICES, BudgetExceeded, OracleError, parse_prices


def prompt_text(prompt):
    """A prompt is a string or a list of chat messages; the judge sees it as text."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def run_api(pending, cfg, endpoints, key, ledger, breaker, done, read_reply):
    """Bounded concurrency: cfg.concurrency threads; `done` caches each answer as soon as it lands,
    so an interrupt, a budget stop or a tripped breaker loses at most the requests in flight.
    read_reply(data, kind, n): oracle.py's reader of one completion."""
    extra = json.loads(cfg.judge_params or "{}")

    def work(u):  # one judge request through chat_api.call
        body = dict(model=cfg.judge_model, messages=u["messages"], max_tokens=u["max_tokens"],
                    temperature=cfg.temperature, **extra)
        if u["kind"] == "verdict":  # llama.cpp needs top_logprobs >= 1
            body.update(logprobs=True, top_logprobs=max(1, cfg.top_logprobs))
        read = lambda data: read_reply(data, u["kind"], u["n"])
        call(endpoints, key, body, read, ledger, breaker, n_in=u["n_in"],
             max_out=u["max_tokens"], retries=cfg.retries, backoff=cfg.backoff,
             seed=f"{cfg.seed}:{u['key']}", keep=lambda value: done(u, value))
    run_pool(work, pending, cfg.concurrency)


def unit_key(parts, changes):
    """A request's cache key: its parts (judge, template, prompt, candidates, decoding) and, once
    the server refused a parameter, what is sent instead (Refusals.changes)."""
    *head, dec = parts
    return digest(*head, {**dec, "sent": changes} if changes else dec)


# ------------------------------------------------------------------------- the local-model judge
def run_local(units, model_dir, batch_size, ledger, done, verdict_prob):
    """The pairwise prompt on a local model.py Transformer: P(A) from the next-token log-softmax
    over the verdict letters (verdict_prob: oracle.py's reader), batches left-padded. model_dir: a
    folder or a hub id ORG/NAME (--judge_model)."""
    import torch
    from dnolib.model import Transformer
    from dnolib.model_io import ModelError, load_tokenizer, resolve_model
    try:  # a folder, or a hub id ORG/NAME -> its cached snapshot, as transformers resolves it
        path = resolve_model(model_dir, what="--judge_model")
        tok, model = load_tokenizer(path), Transformer.from_pretrained(path).eval()
    except ModelError as e:
        raise OracleError(str(e)) from None
    spellings = lambda v: (tok.encode(s, add_special_tokens=False) for s in (v, " " + v))
    letters = {v: {ids[0] for ids in spellings(v) if len(ids) == 1} for v in "AB"}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for s in range(0, len(units), batch_size):
        chunk, rows = units[s:s + batch_size], []
        tickets = [ledger.spend(0, 0) for _ in chunk]
        for u in chunk:
            if tok.chat_template:
                text = tok.apply_chat_template(u["messages"], tokenize=False,
                                               add_generation_prompt=True)
            else:
                text = u["messages"][-1]["content"]
            rows.append(tok(text, add_special_tokens=False)["input_ids"])
        T = max(map(len, rows))
        idx = torch.tensor([[pad] * (T - len(r)) + r for r in rows])  # (B, T) left-padded
        mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])  # (B, T)
        with torch.no_grad():
            padded = bool((mask == 0).any())
            logits = model(idx, attention_mask=mask) if padded else model(idx)  # (B, T, V)
        logp = torch.log_softmax(logits[:, -1].float(), dim=-1)  # (B, V)
        for u, lp, r, ticket in zip(chunk, logp, rows, tickets):
            p = verdict_prob([(v, lp[i].item()) for v in "AB" for i in letters[v]])
            ledger.settle(ticket, len(r), 0)
            if p is None:
                done(u, {"fail": "no_verdict", "error": "no A/B in the vocab"})
            else:
                done(u, {"p": p})


# ----------------------------------------------------------------------------- Python judges
# Deterministic functions of the texts, fn(prompt, candidates); P ones keep P(a>b) + P(b>a) = 1.
def length_judge(prompt, candidates):
    """Longer is better, softly: P(a > b) = sigmoid((len a - len b) / 20 chars)."""
    L = [len(c) for c in candidates]
    sig = lambda d: 1 / (1 + math.exp(-d / 20))
    P = [[0.5 if i == j else sig(a - b) for j, b in enumerate(L)] for i, a in enumerate(L)]
    return {"P": P}


length_judge.score_kind = "winrate"  # a P judge: its scores are win-rates


def overlap_judge(prompt, candidates):
    """A transitive scalar judge: the share of the prompt's distinct words that the candidate
    reuses."""
    words = set(str(prompt).lower().split())
    share = lambda c: len(words & set(c.lower().split())) / max(1, len(words))
    return {"scores": [share(c) for c in candidates]}


overlap_judge.score_kind = "winrate"  # scores in [0, 1]: the win-rate pair rule applies


def cyclic_judge(prompt, candidates):
    """Intransitive rock-paper-scissors on word count mod 3: class c beats class (c - 1) mod 3, so
    1 word > 3 words > 2 words > 1 word: a preference no scalar reward (Bradley-Terry) can
    express."""
    c = [len(t.split()) % 3 for t in candidates]
    beats = lambda a, b: 1.0 if (a - b) % 3 == 1 else 0.0 if (b - a) % 3 == 1 else 0.5
    return {"P": [[beats(a, b) for b in c] for a in c]}


cyclic_judge.score_kind = "winrate"


# The one registry: every Python judge is module:function; these short names are aliases.
ALIASES = {"length": "dnolib.judging:length_judge",
           "overlap": "dnolib.judging:overlap_judge",
           "cyclic": "dnolib.judging:cyclic_judge", "demo": "demo.task:demo",
           "demo_cyclic": "demo.task:demo_cyclic", "demo_rps": "demo.task:demo_rps",
           "demo_bt": "experiments.compare_bt:demo_bt"}
API_JUDGES = ("rubric", "pairwise", "local")  # asked over HTTP or run on a local model
SCORE_RANGE = {"rubric": (0.0, 6.0), "winrate": (0.0, 1.0)}


def resolve(name):
    """--judge NAME -> the Python judge function (an alias or module:function); a one-line
    OracleError."""
    spec = ALIASES.get(name, name)
    if ":" not in spec:
        raise OracleError(f"unknown --judge {name!r}; choose {', '.join(API_JUDGES)}, "
                          f"module:function or one of {', '.join(sorted(ALIASES))}")
    mod, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except ImportError as e:
        raise OracleError(f"--judge {name!r}: cannot import module {mod!r} ({e})") from None
    except AttributeError:
        raise OracleError(f"--judge {name!r}: module {mod!r} has no attribute {attr!r}") from None
    except Exception as e:  # the module itself is broken: say where, in one line
        where = f" ({e.filename}:{e.lineno})" if isinstance(e, SyntaxError) else ""
        first = str(e).splitlines()[0] if str(e) else ""
        raise OracleError(f"--judge {name!r}: importing {mod!r} failed: {type(e).__name__}: "
                          f"{first}{where}") from None
    if not callable(fn):
        raise OracleError(f"--judge {name!r}: {attr!r} is not callable")
    return fn


def score_kind(fn):
    """What a Python judge's "scores" mean: its declared fn.score_kind, else "rubric" (0..6)."""
    return getattr(fn, "score_kind", "rubric")


def identity(fn):
    """The cache's name for a Python judge: module:qualname + a hash of its module's source (or its
    code)."""
    name = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
    try:
        src = inspect.getsource(sys.modules[fn.__module__])
    except (KeyError, OSError, TypeError, AttributeError):
        code = getattr(fn, "__code__", None)
        src = repr((code.co_code, code.co_consts)) if code else repr(fn)
    return f"{name}@{hashlib.sha256(src.encode()).hexdigest()[:16]}"


def wants_context(fn):
    """The keywords among messages= / gold= / id= that fn takes (all three with **kwargs)."""
    try:
        ps = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    if any(p.kind == p.VAR_KEYWORD for p in ps):
        return {"messages", "gold", "id"}
    return {p.name for p in ps if p.name in ("messages", "gold", "id")}


def context_of(item):
    """The extra keyword arguments a Python judge may take, for the candidates as shown."""
    g, raw = item.get("gold_index"), item["prompt"]
    return {"messages": raw if isinstance(raw, list) else None,
            "gold": None if g is None else item["candidates"][g], "id": item["id"]}


def run_fn(units, fn, ledger, done):
    """A Python judge: one call per shown item (unit["item"]), its answer checked against the
    contract."""
    more = wants_context(fn)
    for u in units:
        ticket = ledger.spend(0, 0)
        it = u["item"]
        args = (prompt_text(it["prompt"]), list(it["candidates"]))
        v = fn(*args, **{k: x for k, x in context_of(it).items() if k in more})
        ledger.settle(ticket, 0, 0)
        bad = check_answer(fn, v, len(it["candidates"]))
        if bad:
            raise OracleError(f"judge {getattr(fn, '__name__', fn)} {bad}")
        done(u, v)


def check_answer(fn, v, n):
    """A Python judge's answer -> None if it keeps the contract, else why not (one line)."""
    sized = isinstance(v, dict) and n in (len(v.get("scores") or []), len(v.get("P") or []))
    if not sized:
        return f"returned {str(v)[:60]}; want {{'scores': [n]}} or {{'P': n x n}}"
    if "scores" in v and "P" not in v:
        kind = score_kind(fn)
        lo, hi = SCORE_RANGE.get(kind, (-math.inf, math.inf))
        bad = [s for s in v["scores"] if s is not None and not lo <= s <= hi]
        if kind not in SCORE_RANGE or bad:
            return f"score_kind {kind!r} wants scores in [{lo}, {hi}]; got {bad[:3]}"
    return None




def answer(units, cfg, fn, client, ledger, breaker, progress, *, read_reply, verdict_prob):
    """The units (requests) of a judging -> ({key: cache value}, cache hits): each answered from the
    cache (Cache(cfg.cache)) or asked once (identical keys share one request) by the Python judge,
    the local model or the API client = (client, key). An answer is cached as it lands; a budget
    stop or a tripped breaker ends the asking with every answer so far kept."""
    cache, values, pending, lock = Cache(cfg.cache), {}, {}, threading.Lock()
    for u in units:
        v = cache.data.get(u["key"])
        if v is not None and not (cfg.retry_unreadable and "fail" in v):
            values[u["key"]] = {**v, "_cached": True}
        else:
            pending.setdefault(u["key"], u)
    hits = sum(u["key"] in values for u in units)
    pending = list(pending.values())
    from tqdm import tqdm
    label = getattr(fn, "__name__", cfg.judge) if fn else cfg.judge
    bar = tqdm(total=len(pending), disable=not progress, desc=f"judge[{label}]", unit="call")

    refusals = client[0].refusals if client and client[0] else None
    before = dict(refusals.changes) if refusals else None

    def done(u, v):  # called by the worker threads too
        k = unit_key(u["parts"], refusals.changes) if refusals else u["key"]  # what was sent
        if "fail" not in v or "raw" in v:  # unreadable replies are kept (billed); outages not
            cache.put(k, v)
        with lock:
            values[k] = v
            bar.update(1)
    try:
        if fn is not None:
            run_fn(pending, fn, ledger, done)
        elif cfg.judge == "local":
            run_local(pending, cfg.judge_model, cfg.local_batch_size, ledger, done,
                              verdict_prob)
        elif pending:
            run_api(pending, cfg, *client, ledger, breaker, done, read_reply)
    except (BudgetExceeded, JudgeUnavailable):
        pass  # ledger.stopped / breaker.tripped hold the reason; every answer so far is cached
    finally:
        bar.close()
        cache.close()
    if refusals and refusals.changes != before:  # learned here: every key names what is now sent
        for u in units:
            old, u["key"] = u["key"], unit_key(u["parts"], refusals.changes)
            if u["key"] not in values and old in values:
                values[u["key"]] = values[old]  # a cache hit under the old key
    return values, hits


# ----------------------------------------------------------------------------- keys and the audit
def digest(*parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def nan_to_none(x):
    if isinstance(x, (list, np.ndarray)):
        return [nan_to_none(v) for v in x]
    return None if math.isnan(x) else float(x)


def position_bias(results, winrates):
    """The summary's "position" block over the items judged in both orders (oracle.py's departure 4);
    winrates: dno.winrates."""
    audited = [r for r in results
               if "audit" in r and r["P"] is not None and r["audit"]["P"] is not None]
    flips, pairs, adv = 0, 0, []
    for r in audited:
        A, B = np.array(r["P"], dtype=float), np.array(r["audit"]["P"], dtype=float)  # (n, n)
        n = len(A)
        known = [(i, j) for i in range(n) for j in range(i + 1, n)
                 if not np.isnan(A[i, j] + B[i, j])]
        flips += sum(np.sign(A[i, j] - .5) != np.sign(B[i, j] - .5) for i, j in known)
        pairs += len(known)
        w1, w2 = winrates(A), winrates(B)  # (n,) win-rates among the item's candidates
        s1 = [r["order"].index(i) for i in range(n)]
        s2 = [r["audit"]["order"].index(i) for i in range(n)]
        d = [(w1[i] - w2[i]) * (1 if s1[i] < s2[i] else -1) for i in range(n) if s1[i] != s2[i]]
        d = [x for x in d if not np.isnan(x)]  # earlier minus later, per candidate
        adv += [sum(d) / len(d)] if d else []
    return {"items": len(audited), "rank_disagreement": flips / pairs if pairs else None,
            "first_slot_advantage": sum(adv) / len(adv) if adv else None}

# ----------------------------------------------------------------------------- inputs
def check_inputs(items, cfg, fn):
    """-> the Python judge to use (or None); a one-line OracleError for any user mistake."""
    if fn is None and cfg.judge not in API_JUDGES:
        fn = resolve(cfg.judge)
    for it in items:
        cands = it.get("candidates") if isinstance(it, dict) else None
        if not (isinstance(cands, list) and "id" in it and "prompt" in it
                and all(isinstance(c, str) for c in cands)):
            raise OracleError(f"bad item {str(it)[:80]!r}: need 'id', 'prompt' and 'candidates' "
                              "(a list of strings)")
    try:
        obj = json.loads(cfg.judge_params or "{}")
        assert isinstance(obj, dict)
    except (ValueError, AssertionError):
        raise OracleError(f"--judge_params must be a JSON object, got {cfg.judge_params!r}") from None
    parse_prices(cfg.prices)  # a negative price would credit the budget
    return fn


def check_judge(cfg):
    """An API or local judge's model and price -> its price (in, out) or None; a one-line
    OracleError when --judge_model is missing (there is no default: models are shut down) or when
    --max_usd is set and no price is known for it."""
    if not cfg.judge_model:
        raise OracleError(f"--judge {cfg.judge} needs --judge_model: the model at the endpoint "
                          "(e.g. gpt-4.1-mini), or for --judge local its folder or hub id")
    if cfg.judge == "local":
        return 0.0, 0.0
    price = {**PRICES, **parse_prices(cfg.prices)}.get(cfg.judge_model)
    if price is None and cfg.max_usd:
        raise OracleError(f"no price known for model {cfg.judge_model!r} under --max_usd: pass "
                          f"--prices {cfg.judge_model}=USD_IN,USD_OUT (per 1M tokens)")
    return price


def load_samples(path):
    """samples JSONL {"id", "prompt", "samples", "gold"?} -> items with candidates = samples (+
    gold)."""
    with open(path, encoding="utf-8") as f:
        lines = list(enumerate(f, 1))
    items = []
    for ln, line in lines:
        try:
            rec = json.loads(line) if line.strip() else None
            if rec is not None:
                has_gold = rec.get("gold") is not None
                if has_gold and not (isinstance(rec["gold"], str) and rec["gold"].strip()):
                    raise ValueError(f"gold must be a non-empty text, got {rec['gold']!r:.40}")
                cands = list(rec["samples"]) + ([rec["gold"]] if has_gold else [])
                gold = len(cands) - 1 if has_gold else None
                items.append({"id": str(rec.get("id", ln)), "prompt": rec["prompt"],
                              "candidates": cands, "gold_index": gold})
        except (ValueError, KeyError, TypeError) as e:
            raise OracleError(f"{path}:{ln}: bad samples line ({type(e).__name__}: {e})")
    return items

if __name__ == "__main__":
    items = [("pick", ["rock", "paper cuts", "scissors cut it"]),
             ("say hi", ["hi", "hi there, friend"])]
    for name in ("length", "overlap", "cyclic"):
        fn = resolve(name)
        print(f"{name:8s} ({score_kind(fn)})", [fn(p, c) for p, c in items])

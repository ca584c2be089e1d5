"""oracle.py -- how a DNO run asks its judge for P(y > y' | x), its money and its audit.

Usage:
  python oracle.py                               # offline demo: the Python judges on two items
  python oracle.py --judge mymod:judge --samples s.jsonl --out j.jsonl   # yours, or --judge cyclic
  OPENAI_API_KEY=sk-... python oracle.py --judge rubric --judge_model gpt-4-turbo --max_usd 5 \
      --ledger run/ledger.json --samples s.jsonl --out j.jsonl   # one budget, many processes
  OPENAI_API_KEY=x python oracle.py --judge pairwise --base_url http://127.0.0.1:8080/v1 \
      --judge_model tiny --samples s.jsonl --out j.jsonl         # llama.cpp / vLLM / Ollama

It plans the requests, shuffles the candidates, caches the answers, keeps the budget, assembles and
audits the results. What a judge says (and the judge contract) is judges.py; HTTP, breaker and
cache are chat_api.py; the run's spending ledger and its budget are ledger.py.

Input lines {"id", "prompt" (text or chat), "samples", "gold"?} (gold: the last candidate). Output
lines: {"id", "ok", "error", "scores", "score_kind" ("rubric": 0..6 | "winrate": in [0, 1]), "P",
"disagreement", "cached", "order", "truncated", "max_judge_tokens", "rationale" (the raw rubric
reply), "audit"?} in the ORIGINAL candidate order, with the input's fields, then a summary line
is printed. The CLI exits non-zero when more than --max_failure_rate of the items failed.

Asked again: transport failures (not cached); a reply that arrived but cannot be read is cached
with its raw text (it was billed) and bought again only with --retry_unreadable; a request in
flight at a kill -9 (at most --concurrency) may be resent by the rerun: the ledger keeps it at its
worst case as "unsettled". The key (from the variable named by --api_key_env) is never written.

Departures from the paper (numbered; the judges' own are in judges.py):
1. Rubric scores give P[i][j] = 1/0.5/0 by comparison; the "scores" of P judges are win-rates.
2. Candidates are cut only when a request would not fit --judge_context, the room left split
   evenly among one request's candidates (--max_judge_tokens > 0: a fixed cap instead).
3. A failed judgment is explicit (ok=False, None entries), never turned into a winner or a zero.
4. Candidates are shown in a seeded random order per item ("order"), which the paper does not
   state; --position_audit judges a seeded share of items again reversed (listwise judges only)
   and reports rank_disagreement (share of audited pairs whose outcome, i wins / tie / j wins,
   flips) and first_slot_advantage (mean over items of the mean over moved candidates of
   win-rate shown earlier - shown later, in [-1, 1]).
"""
from dnolib.cli import early_help
if __name__ == "__main__":
    early_help(__file__)                                # --help before torch loads: under a second

import hashlib, json, math, os, random, sys, threading, time
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

import dno
import judges
from dnolib.chat_api import (Breaker, Cache, JudgeUnavailable, call, connect, count_tokens, encoder,
                      endpoint, fit, host, run_pool)
from dnolib.cli import check, cli
from dnolib.ledger import PRICES, BudgetExceeded, Ledger, OracleError


@dataclass
class Config:
    judge: str = "rubric"          # rubric | pairwise | local | module:function | an alias
    samples: str = ""              # CLI input: samples JSONL
    out: str = "judgments.jsonl"   # CLI output: judgments JSONL
    base_url: str = ""             # OpenAI-compatible endpoint; "" = $OPENAI_BASE_URL or OpenAI
    judge_model: str = "gpt-4-turbo"  # model at the endpoint; --judge local: its folder or hub id
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the env var holding the key (never stored)
    local_batch_size: int = 8      # prompts per forward pass of the local judge
    concurrency: int = 8           # requests in flight
    retries: int = 4               # retries on transient failures (refused connections: 2)
    backoff: float = 0.5           # base seconds of backoff (x2 per retry, with jitter)
    timeout: float = 60.0          # seconds per request
    breaker: int = 8               # stop after this many failed requests in a row (0 = never)
    max_judge_tokens: int = 0      # > 0: fixed cap per candidate (tokens); 0: only to fit
    judge_context: int = 128000    # tokens of the judge model's context window
    max_new_tokens: int = 1536     # cap on the rubric judge's own answer (K+1 justifications)
    temperature: float = 0.0       # judge decoding temperature
    top_logprobs: int = 5          # alternatives read at the verdict token (pairwise)
    extra_body: str = ""           # JSON merged into each request, e.g. '{"repeat_penalty": 1.0}'
    encoding: str = ""             # tiktoken encoding or local .tiktoken file; "" -> by model
    cache: str = "judge_cache.jsonl"  # append-only JSONL cache; "" disables
    ledger: str = ""               # JSON file of the run's spend, shared by processes
    max_usd: float = 0.0           # hard budget in dollars (0 = none); the ledger's with --ledger
    max_calls: int = 0             # hard budget in requests (0 = none); the ledger's with --ledger
    prices: str = ""               # JSON prices {"model": [usd_in_per_1M, usd_out_per_1M]}
    shuffle: bool = True           # show candidates in a seeded random order (departure 4)
    position_audit: float = 0.0    # share of items judged again in reversed order (departure 4)
    seed: int = 0                  # seed of the orders, the audit sample and the retry jitter
    retry_unreadable: bool = False  # buy again replies that arrived but could not be read
    max_failure_rate: float = 0.0  # CLI: exit non-zero when a larger share of the items failed


inf, GE0, GE1 = math.inf, (0, math.inf, ">= 0"), (1, math.inf, ">= 1")
POS, UNIT = (1e-300, inf, "finite and > 0"), (0, 1, "in [0, 1]")
LIMITS = {  # flag: (lowest, highest, in words), checked by cli.check before any work
    "local_batch_size": GE1, "concurrency": GE1, "retries": GE0, "backoff": GE0, "timeout": POS,
    "breaker": GE0, "max_judge_tokens": GE0, "judge_context": (256, inf, ">= 256"),
    "max_new_tokens": GE1, "temperature": GE0, "top_logprobs": (0, 20, "in [0, 20]"),
    "max_usd": GE0, "max_calls": GE0, "position_audit": UNIT, "max_failure_rate": UNIT}
RUN_FLAGS = ("judge", "base_url", "judge_model", "api_key_env", "concurrency", "max_usd",
             "max_calls", "position_audit", "judge_context", "seed")  # train.py's, same names


def make_judge(cfg):
    """train.py's flags -> (Config, fn or None): the run's judge, cached in OUT/judge_cache.jsonl
    and budgeted by OUT/judge_ledger.json. A bad judge, URL or missing key is refused here, before
    any work."""
    ocfg = Config(**{k: getattr(cfg, k) for k in RUN_FLAGS},
                  cache=os.path.join(cfg.out, "judge_cache.jsonl"),
                  ledger=os.path.join(cfg.out, "judge_ledger.json"))
    if ocfg.judge in ("rubric", "pairwise"):
        connect(ocfg.base_url, ocfg.api_key_env, ocfg.timeout)
        return ocfg, None
    return ocfg, None if ocfg.judge == "local" else judges.resolve(ocfg.judge)


# ----------------------------------------------------------------------------- planning
def shown_orders(item, cfg, listwise):
    """-> [main order, reversed order if audited]; order[k] = original index of the candidate in
    slot k. Only listwise judges are audited: pairwise ones see every pair in both orders."""
    key, order = f"{cfg.seed}:{item['id']}", list(range(len(item["candidates"])))
    if cfg.shuffle and item.get("shuffle", True):
        random.Random(key).shuffle(order)  # str seeds are stable across processes and resumes
    share = cfg.position_audit if listwise else 0.0
    audit = int(hashlib.sha256(f"audit:{key}".encode()).hexdigest()[:8], 16) / 2 ** 32 < share
    return [order, order[::-1]] if audit else [order]


def show(item, order):
    g = item.get("gold_index")
    return {**item, "candidates": [item["candidates"][k] for k in order],
            "gold_index": None if g is None else order.index(g)}


def digest(*parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def plan_item(item, cfg, fn, enc, judge_id):
    """-> (units, truncated, cap): the requests one item needs as shown (1 for rubric / Python
    judges, n(n-1) ordered pairs otherwise), each keyed by a hash of (judge identity, template
    version, prompt, ordered candidates, decoding)."""
    prompt, cands = item["prompt"], list(item["candidates"])
    if fn is not None:
        ctx = judges.context_of(item) if judges.wants_context(fn) else {}
        return [{"key": digest(judge_id, prompt, cands, ctx), "kind": "fn", "item": item,
                 "score_kind": judges.score_kind(fn)}], [], None
    text, rubric = judges.prompt_text(prompt), cfg.judge == "rubric"
    if rubric:
        empty = judges.rubric_prompt(text, [""] * len(cands))
    else:
        empty = judges.pairwise_prompt(text, "", "")
    out = cfg.max_new_tokens if rubric else 1
    room = cfg.judge_context - count_tokens(enc, judges.SYSTEM + empty) - 10 - out  # departure 2
    per_request = len(cands) if rubric else 2
    cands, truncated, cap = fit(cands, enc, cfg.max_judge_tokens, room, per_request)
    dec = {"temperature": cfg.temperature, "extra_body": cfg.extra_body, "max_tokens": out}

    def unit(kind, content, order):
        dec_u = {**dec, **({"top_logprobs": cfg.top_logprobs} if kind == "verdict" else {})}
        shown = [cands[k] for k in order]
        return {"key": digest(judge_id, judges.TEMPLATE_VERSION, kind, text, shown, dec_u),
                "kind": kind, "pair": tuple(order), "n": len(cands), "max_tokens": out,
                "n_in": count_tokens(enc, judges.SYSTEM + content) + 10,  # + chat-format overhead
                "messages": [{"role": "system", "content": judges.SYSTEM},
                             {"role": "user", "content": content}]}
    if rubric:
        units = [unit("rubric", judges.rubric_prompt(text, cands), range(len(cands)))]
        return units, truncated, cap
    pairs = [(a, b) for a in range(len(cands)) for b in range(len(cands)) if a != b]
    units = [unit("verdict", judges.pairwise_prompt(text, cands[a], cands[b]), (a, b))
             for a, b in pairs]
    return units, truncated, cap


# ----------------------------------------------------------------------------- assembly and audit
def nan_to_none(x):
    if isinstance(x, (list, np.ndarray)):
        return [nan_to_none(v) for v in x]
    return None if math.isnan(x) else float(x)


def assemble(item, units, values, why):
    """Cache values of one shown item's units -> the contract's result in shown order (P[i][j] =
    P(i > j))."""
    n, vals = len(item["candidates"]), [values.get(u["key"]) for u in units]
    res = {"id": item["id"], "ok": False, "error": None, "scores": None, "P": None,
           "disagreement": None, "cached": all(v is not None and v.get("_cached") for v in vals)}
    if any(v is None for v in vals):
        return {**res, "error": f"not judged: {why}"}
    first, fails, kind = vals[0], [v for v in vals if "fail" in v], units[0]["kind"]
    if kind == "rubric" or (kind == "fn" and "P" not in first):  # P from scores (departure 1)
        s = first.get("scores")
        P = None if s is None else dno.table_from_scores(s)
        res.update(scores=s, score_kind=units[0].get("score_kind", "rubric"))
        if kind == "rubric":
            res["rationale"] = first.get("raw")
    else:
        if kind == "fn":
            P = np.array(first["P"], dtype=float)  # (n, n), None -> NaN
        else:  # both orders of each pair: P(i > j) = (p(i first wins) + 1 - p(j first wins)) / 2
            p = {u["pair"]: np.nan if v.get("p") is None else v["p"] for u, v in zip(units, vals)}
            P = np.array([[0.5 if i == j else (p[i, j] + 1 - p[j, i]) / 2 for j in range(n)]
                          for i in range(n)])
            both = [(p[i, j], p[j, i]) for i in range(n) for j in range(i + 1, n)
                    if not np.isnan(p[i, j] + p[j, i])]
            # the two orders disagree when both say "first wins" or both say "second wins"
            flips = sum((a - .5) * (b - .5) > 0 for a, b in both)
            res["disagreement"] = flips / len(both) if both else None
        res.update(scores=nan_to_none(dno.winrates(P)), score_kind="winrate")
    if P is not None:
        np.fill_diagonal(P, 0.5)
        res["P"] = nan_to_none(P)
    res["ok"] = not fails and P is not None and not np.isnan(P).any()
    if fails:
        more = f" (+{len(fails) - 1} more)" if len(fails) > 1 else ""
        res["error"] = f"{fails[0]['fail']}: {fails[0]['error']}{more}"
    return res


def unshuffle(res, order, truncated):
    """Shown order -> original order: the candidate in slot k is the original candidate
    order[k]."""
    slot = sorted(range(len(order)), key=order.__getitem__)  # slot[i]: where candidate i was shown
    n = len(order)
    if res["scores"] is not None:
        res["scores"] = [res["scores"][slot[i]] for i in range(n)]
    if res["P"] is not None:
        res["P"] = [[res["P"][slot[i]][slot[j]] for j in range(n)] for i in range(n)]
    return {**res, "order": list(order), "truncated": sorted(order[k] for k in truncated)}


def position_bias(results):
    """The summary's "position" block over the items judged in both orders (departure 4)."""
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
        w1, w2 = dno.winrates(A), dno.winrates(B)  # (n,) win-rates among the item's candidates
        s1 = [r["order"].index(i) for i in range(n)]
        s2 = [r["audit"]["order"].index(i) for i in range(n)]
        d = [(w1[i] - w2[i]) * (1 if s1[i] < s2[i] else -1) for i in range(n) if s1[i] != s2[i]]
        d = [x for x in d if not np.isnan(x)]  # earlier minus later, per candidate
        adv += [sum(d) / len(d)] if d else []
    return {"items": len(audited), "rank_disagreement": flips / pairs if pairs else None,
            "first_slot_advantage": sum(adv) / len(adv) if adv else None}


# ----------------------------------------------------------------------------- asking
def check_inputs(items, cfg, fn):
    """-> the Python judge to use (or None); a one-line OracleError for any user mistake."""
    if fn is None and cfg.judge not in judges.API_JUDGES:
        fn = judges.resolve(cfg.judge)
    for it in items:
        cands = it.get("candidates") if isinstance(it, dict) else None
        if not (isinstance(cands, list) and "id" in it and "prompt" in it
                and all(isinstance(c, str) for c in cands)):
            raise OracleError(f"bad item {str(it)[:80]!r}: need 'id', 'prompt' and 'candidates' "
                              "(a list of strings)")
    for flag, text in (("extra_body", cfg.extra_body), ("prices", cfg.prices)):
        try:
            obj = json.loads(text or "{}")
            assert isinstance(obj, dict)
            assert flag == "extra_body" or all(len(v) == 2 for v in obj.values())
        except (ValueError, AssertionError, TypeError):
            raise OracleError(f"--{flag} must be a JSON object (--prices: "
                              f"{{\"model\": [in, out]}}), got {text!r}") from None
    return fn


def run_api(pending, cfg, client, key, ledger, breaker, done):
    """Bounded concurrency: cfg.concurrency threads; `done` caches each answer as soon as it lands,
    so an interrupt, a budget stop or a tripped breaker loses at most the requests in flight."""
    extra = json.loads(cfg.extra_body or "{}")

    def work(u):  # one judge request through chat_api.call
        body = dict(model=cfg.judge_model, messages=u["messages"], max_tokens=u["max_tokens"],
                    temperature=cfg.temperature, **extra)
        if u["kind"] == "verdict":  # llama.cpp needs top_logprobs >= 1
            body.update(logprobs=True, top_logprobs=max(1, cfg.top_logprobs))
        read = lambda data: judges.read_reply(data, u["kind"], u["n"])
        call(client, key, body, read, ledger, breaker, n_in=u["n_in"], max_out=u["max_tokens"],
             retries=cfg.retries, backoff=cfg.backoff, seed=f"{cfg.seed}:{u['key']}",
             keep=lambda value: done(u, value))
    run_pool(work, pending, cfg.concurrency)


def judge_items(items, cfg, *, fn=None, progress=True):
    """Judge each {"id", "prompt", "candidates"} -> (results in the same order, summary)."""
    t0, fn = time.time(), check_inputs(items, cfg, fn)
    api = fn is None and cfg.judge != "local"
    client, key = connect(cfg.base_url, cfg.api_key_env, cfg.timeout) if api else (None, "")
    prices = {**PRICES, **json.loads(cfg.prices or "{}")}
    price = prices.get(cfg.judge_model) if api else (0.0, 0.0)
    if price is None and cfg.max_usd:
        raise OracleError(f"no price known for model {cfg.judge_model!r}: pass --prices "
                          f"'{{\"{cfg.judge_model}\": [in, out]}}'")
    ledger = Ledger(price or (0.0, 0.0), cfg.max_usd, cfg.max_calls, cfg.ledger, durable=api)
    breaker = Breaker(cfg.breaker, endpoint(cfg.base_url) if api else cfg.judge)
    enc = encoder(cfg.judge_model, cfg.encoding, warn=bool(cfg.max_usd and price)) if api else None
    name = cfg.judge_model  # a local judge: a folder (by absolute path) or a hub id (as given)
    local = f"local:{os.path.abspath(name) if os.path.exists(name) else name}"
    judge_id = f"{host(cfg.base_url)}|{cfg.judge_model}" if api else local
    judge_id = judges.identity(fn) if fn else judge_id  # what the cache knows the judge by
    listwise = fn is not None or cfg.judge == "rubric"
    views = [(k, order, show(it, order)) for k, it in enumerate(items)
             for order in shown_orders(it, cfg, listwise)]
    plans = [plan_item(v, cfg, fn, enc, judge_id) for _, _, v in views]
    cache, values, pending, lock = Cache(cfg.cache), {}, {}, threading.Lock()
    for u in (u for units, _, _ in plans for u in units):
        v = cache.data.get(u["key"])
        if v is not None and not (cfg.retry_unreadable and "fail" in v):
            values[u["key"]] = {**v, "_cached": True}
        else:
            pending.setdefault(u["key"], u)
    hits = sum(u["key"] in values for units, _, _ in plans for u in units)
    pending = list(pending.values())
    from tqdm import tqdm
    label = getattr(fn, "__name__", cfg.judge) if fn else cfg.judge
    bar = tqdm(total=len(pending), disable=not progress, desc=f"judge[{label}]", unit="call")

    def done(u, v):  # called by the worker threads too
        if "fail" not in v or "raw" in v:  # unreadable replies are kept (billed); outages not
            cache.put(u["key"], v)
        with lock:
            values[u["key"]] = v
            bar.update(1)
    try:
        if fn is not None:
            judges.run_fn(pending, fn, ledger, done)
        elif cfg.judge == "local":
            judges.run_local(pending, cfg.judge_model, cfg.local_batch_size, ledger, done)
        elif pending:
            run_api(pending, cfg, client, key, ledger, breaker, done)
    except (BudgetExceeded, JudgeUnavailable):
        pass  # ledger.stopped / breaker.tripped hold the reason; every answer so far is cached
    finally:
        bar.close()
        cache.close()
    why = "judge unavailable" if breaker.tripped else "budget exhausted"
    results = [None] * len(items)
    for (k, order, view), (units, tr, cap) in zip(views, plans):
        r = unshuffle(assemble(view, units, values, why), order, tr)
        if results[k] is None:
            results[k] = {**r, "max_judge_tokens": cap}
        else:  # the position audit: the same item in the reversed order
            results[k]["audit"] = {x: r[x] for x in ("order", "ok", "scores", "P")}
    dis = [r["disagreement"] for r in results if r["disagreement"] is not None]
    spent, fails = ledger.session(), Counter(v["fail"] for v in values.values() if "fail" in v)
    summary = {"items": len(items), "ok": sum(r["ok"] for r in results),
               "calls": spent["calls"], "retries": spent["retries"], "cache_hits": hits,
               "failures": dict(fails), "order_disagreement": sum(dis) / len(dis) if dis else None,
               "position": position_bias(results), "tokens_in": spent["tokens_in"],
               "tokens_out": spent["tokens_out"], "usd": spent["usd"], "run": ledger.totals(),
               "price_known": price is not None,
               "truncated": sum(len(r["truncated"]) for r in results),
               "seconds": round(time.time() - t0, 3)}
    tail = f"; {summary['ok']}/{len(items)} items judged and cached"
    if breaker.tripped:
        why = breaker.tripped + tail + " (rerun to re-ask the rest)"
        raise JudgeUnavailable(why, results, summary)
    if ledger.stopped:
        why = f"budget exhausted: {ledger.stopped}{tail} (rerun with a larger budget to resume)"
        raise BudgetExceeded(why, results, summary)
    return results, summary


# ----------------------------------------------------------------------------- CLI
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
                cands = list(rec["samples"]) + ([rec["gold"]] if has_gold else [])
                gold = len(cands) - 1 if has_gold else None
                items.append({"id": str(rec.get("id", ln)), "prompt": rec["prompt"],
                              "candidates": cands, "gold_index": gold})
        except (ValueError, KeyError, TypeError) as e:
            raise OracleError(f"{path}:{ln}: bad samples line ({type(e).__name__}: {e})")
    return items


def main(argv=None):
    cfg = cli(Config, argv)
    try:
        check(cfg, limits=LIMITS)  # every flag before any work; credentials in a URL never echoed
        if cfg.judge in ("rubric", "pairwise"):
            endpoint(cfg.base_url)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if not cfg.samples:  # demo: the offline Python judges on two items, no cache
        items = [{"id": "rps", "prompt": "pick", "candidates": ["rock", "paper", "scissors cut"]},
                 {"id": "len", "prompt": "say hi", "candidates": ["hi", "hi there, you", "hey"]}]
        for name in ("length", "overlap", "cyclic"):
            res, _ = judge_items(items, Config(judge=name, cache=""), progress=False)
            print(f"{name:8s}", [[[round(x, 2) for x in row] for row in r["P"]] for r in res])
        return
    print(json.dumps({"config": asdict(cfg)}), file=sys.stderr)  # the key's variable NAME only
    try:
        items = load_samples(cfg.samples)
        results, s = judge_items(items, cfg)
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
        with open(cfg.out, "w", encoding="utf-8") as f:
            for it, r in zip(items, results):
                keep = {k: it[k] for k in ("prompt", "candidates", "gold_index")}
                f.write(json.dumps({**r, **keep}) + "\n")
    except (BudgetExceeded, JudgeUnavailable) as e:
        print(json.dumps({"summary": e.summary}), file=sys.stderr)
        sys.exit(f"error: {e}")
    except (OracleError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"judged {s['items']} items ({s['ok']} ok) | calls {s['calls']} (retries "
          f"{s['retries']}) | cache hits {s['cache_hits']} | failures {s['failures']} | order "
          f"disagreement {s['order_disagreement']} | position {s['position']} | tokens "
          f"{s['tokens_in']} in / {s['tokens_out']} out | ${s['usd']:.4f} | unsettled "
          f"{s['run']['unsettled']} | {s['seconds']}s")
    failed = [r for r in results if not r["ok"]]
    if len(failed) > cfg.max_failure_rate * len(results):
        sys.exit(f"error: {len(failed)} of {len(results)} items failed (> --max_failure_rate "
                 f"{cfg.max_failure_rate}; first: {failed[0]['error']}); {cfg.out} is written, a "
                 "rerun re-asks the failures")


if __name__ == "__main__":
    main()

"""oracle.py: Alg. 2, line 5 -- the preference oracle P(y > y' | x): Fig. 3's rubric, the pairwise
verdict, how a run asks, reads, pays and audits.

Usage:
  python oracle.py                               # offline demo: the Python judges on two items
  python oracle.py --judge mymod:judge --samples s.jsonl --out j.jsonl   # yours, or --judge cyclic
  OPENAI_API_KEY=sk-... python oracle.py --judge rubric --judge_model gpt-4.1-mini --max_usd 5 \
      --ledger run/ledger.json --samples s.jsonl --out j.jsonl   # one budget, many processes
  OPENAI_API_KEY=x python oracle.py --judge pairwise --base_url http://127.0.0.1:8080/v1 \
      --judge_model tiny --samples s.jsonl --out j.jsonl         # llama.cpp / vLLM / Ollama

What the judge is asked (Fig. 3's rubric, the pairwise verdict) and how its replies are read are
here, with the planning of the requests, the shown orders, the assembly of P and the position
audit. The machinery is in dnolib/: judging.py sends the requests (and holds the Python judges'
registry and contract), chat_api.py is HTTP, the breaker and the cache, ledger.py the run's budget.

Input lines {"id", "prompt" (text or chat), "samples", "gold"?} (gold: the last candidate). Output
lines: {"id", "ok", "error", "scores", "score_kind" ("rubric": 0..6 | "winrate": in [0, 1]), "P",
"disagreement", "cached", "order", "truncated", "max_judge_tokens", "rationale" (the raw rubric
reply), "audit"?} in the ORIGINAL candidate order, with the input's fields, then a summary line
is printed. The CLI exits non-zero when more than --max_failure_rate of the items failed.

Asked again: transport failures (not cached); a reply that arrived but cannot be read is cached
with its raw text (it was billed) and bought again only with --retry_unreadable; a request in
flight at a kill -9 (at most --concurrency) may be resent by the rerun: the ledger keeps it at its
worst case as "unsettled". The key (from the variable named by --api_key_env) is never written.
A parameter the server refuses is learned from its 400 once (chat_api.Refusals, kept in --refused);
--base_url a,b spreads requests over endpoints, skipping a dead one (chat_api.Endpoints).

Departures from the paper (numbered):
1. Rubric scores give P[i][j] = 1/0.5/0 by comparison; the "scores" of P judges are win-rates.
2. Candidates are cut only when a request would not fit --judge_context, the room left split
   evenly among one request's candidates (--max_judge_tokens > 0: a fixed cap instead).
3. A failed judgment is explicit (ok=False, None entries), never turned into a winner or a zero.
4. Candidates are shown in a seeded random order per item ("order"), which the paper does not
   state; --position_audit judges a seeded share of items again reversed (listwise judges only)
   and reports rank_disagreement (share of audited pairs whose outcome, i wins / tie / j wins,
   flips) and first_slot_advantage (mean over items of the mean over moved candidates of
   win-rate shown earlier - shown later, in [-1, 1]).
5. The rubric is Fig. 3 in our own words, every clause kept (docs/paper.md's table maps each one),
   in its layout (the additive scale, then "### User:", "### Candidate Responses:" and
   "### Instructions:"), with no system message. Ours: each candidate sits between "[Candidate
   k]" and "[End of candidate k]" (the figure shows "<candidate answers>"), and the score is named
   an integer 0..6.
6. The paper's judge is GPT-4-Turbo; ours is any OpenAI-compatible endpoint (or a Python judge).
   Fig. 3 asks for "a python dictionary"; ours asks for the same dictionary as JSON, which it reads.
7. Fig. 3 prefills the start of the answer dictionary in the assistant's turn. Chat APIs cannot,
   so the user turn ends with it (PREFILL) and the reply is read either as a whole dictionary or
   as the rest of the prefilled one; the integer under "idK_score" is what counts.
8. The reply is read as the one document the judge wrote (the reply alone when it starts a
   dictionary, else PREFILL + reply), one JSON object decoded from its start: exactly the keys
   id1_score..idn_score, integers 0..6, no key twice; anything else is a failed judgment with the
   raw reply kept, never a default score. Text after that object is kept raw and never read, so
   no candidate's text (quoted or echoed) can set another one's score.
9. The pairwise and local judges are not in the paper (it ranks by rubric scores only); they give a
   soft P(y > y' | x) from the verdict token's log-probs (tokens normalised: case, width, markup,
   a leading space); a token that is neither and outweighs both letters is a failure.
"""
from dnolib.cli import early_help
if __name__ == "__main__":
    early_help(__file__)                                # --help before torch loads: under a second

import hashlib
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace

import numpy as np

import dno
from dnolib import chat_api, judging, reply
from dnolib.chat_api import (Breaker, JudgeUnavailable, connect, count_tokens, encoder,
                             fit, host)
from dnolib.cli import check, cli
from dnolib.distributed import print0
from dnolib.judging import prompt_text
from dnolib.ledger import BudgetExceeded, Ledger, OracleError


@dataclass
class Config:
    judge: str = "rubric"          # rubric | pairwise | local | module:function | an alias
    samples: str = ""              # CLI input: samples JSONL
    out: str = "judgments.jsonl"   # CLI output: judgments JSONL
    base_url: str = ""             # OpenAI-compatible endpoint; "" = $OPENAI_BASE_URL or OpenAI
    judge_model: str = ""          # model at the endpoint (required); local: its folder or hub id
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the env var holding the key (never stored)
    local_batch_size: int = 8      # prompts per forward pass of the local judge
    concurrency: int = 8           # requests in flight
    retries: int = 4               # retries on transient failures (refused connections: 2)
    backoff: float = 0.5           # base seconds of backoff (x2 per retry, with jitter)
    timeout: float = 60.0          # seconds per request, whole (a slowly dripping reply included)
    max_reply_bytes: int = 1048576  # a reply past this is cut and fails ("too_large"), billed
    breaker: int = 8               # stop after this many failed requests in a row (0 = never)
    judge_wait: float = 0.0        # seconds to wait for the judge server to answer /models first
    max_judge_tokens: int = 0      # > 0: fixed cap per candidate (tokens); 0: only to fit
    judge_context: int = 128000    # tokens of the judge model's context window
    max_new_tokens: int = 1536     # cap on the rubric judge's own answer (K+1 justifications)
    temperature: float = 0.0       # judge decoding temperature
    top_logprobs: int = 5          # alternatives read at the verdict token (pairwise)
    judge_params: str = ""         # JSON merged into each request, e.g. '{"reasoning_effort": "low"}'
    encoding: str = ""             # tiktoken encoding or local .tiktoken file; "" -> by model
    cache: str = "judge_cache.jsonl"  # append-only JSONL cache; "" disables
    refused: str = "judge_refused.json"  # parameters the server refused, learned once ("": none)
    ledger: str = ""               # JSON file of the run's spend, shared by processes
    max_usd: float = 0.0           # hard budget in dollars (0 = none); the ledger's with --ledger
    max_calls: int = 0             # hard budget in requests (0 = none); the ledger's with --ledger
    prices: str = ""               # $ per 1M tokens: model=in,out[;m2=in,out] | JSON | a JSON file
    shuffle: bool = True           # show candidates in a seeded random order (departure 4)
    position_audit: float = 0.0    # share of items judged again in reversed order (departure 4)
    seed: int = 0                  # seed of the orders, the audit sample and the retry jitter
    retry_unreadable: bool = False  # buy again replies that arrived but could not be read
    max_failure_rate: float = 0.0  # CLI: exit non-zero when a larger share of the items failed


inf, GE0, GE1 = math.inf, (0, math.inf, ">= 0"), (1, math.inf, ">= 1")
POS, UNIT = (1e-300, inf, "finite and > 0"), (0, 1, "in [0, 1]")
LIMITS = {  # flag: (lowest, highest, in words), checked by cli.check before any work
    "local_batch_size": GE1, "concurrency": GE1, "retries": GE0, "backoff": GE0, "timeout": POS,
    "breaker": GE0, "max_judge_tokens": GE0, "max_reply_bytes": (1024, inf, ">= 1024"),
    "judge_context": (256, inf, ">= 256"),
    "max_new_tokens": GE1, "temperature": GE0, "top_logprobs": (0, 20, "in [0, 20]"),
    "max_usd": GE0, "max_calls": GE0, "position_audit": UNIT, "judge_wait": GE0,
    "max_failure_rate": UNIT}
RUN_FLAGS = ("judge", "base_url", "judge_model", "api_key_env", "concurrency", "max_usd",
             "max_calls", "position_audit", "judge_context", "seed", "prices", "judge_wait",
             "judge_params")


# ----------------------------------------------------------------------------- what the judge is asked
TEMPLATE_VERSION = "dno-judges-v5"  # bump when a template below changes: it is in every cache key
PREFILL = '{"id1_justification": "'  # the start of the answer dictionary (departure 7)
# Fig. 3 in our words (departure 5); points 3-6 each carry a length clause (tests/test_figure3.py)
RUBRIC_TEMPLATE = """Read the user's question and the candidate responses to it, and grade them
with the additive 6-point scale below: a response earns one point for each criterion it meets, and
its score is the sum of the points it earns.
1. Give 1 point if the response has the form of an answer: for example it does not say the same
   thing over and over, it does not carry on the question, and it is not a run of unrelated
   question/answer pairs or examples.
2. Add 1 more point if the response is on topic and offers at least some information that bears
   on the user's question, even when it is partial or includes some off-topic material.
3. Add a third point if the response covers a substantial part of the user's question without
   rambling, even if it does not settle the question fully or give a direct answer.
4. Award a fourth point if the response responds correctly to nearly every element of the user's
   question, usefully and directly, with hardly any errors, extraneous content or excess
   wordiness.
5. Grant a fifth point if the response is entirely correct, free of any errors or made-up facts,
   and directly answers every aspect of the user's question in a style that is helpful,
   well-organised, focused and succinct.
6. Bestow a sixth point if the response is entirely correct *AND* concise: impeccably tailored to
   the user's question, with no unnecessary information and no wordiness at all, reflecting
   expert knowledge, a superbly high-quality, focused and insightful answer.

### User:
{prompt}

### Candidate Responses:
{candidates}

### Instructions:
Once you have read the user's question and the responses:
1. For EACH response, justify its total briefly, in at most 100 words.
2. Score EACH response, ending its justification with the line "Score: <points>".

Judge from the AI Assistant's perspective, drawing on web-search knowledge where it helps. Apply
the additive scale above criterion by criterion, and score EACH candidate on its own. Write your
justifications and scores as one dictionary and nothing else (JSON: double-quoted keys and
strings), with the keys "id<k>_justification" and "id<k>_score" (an integer from 0 to 6) for the
k-th response, k = 1..{n}:
{{"id1_justification": "...", "id1_score": <points>, ...,
"id{n}_justification": "...", "id{n}_score": <points>}}
"""
CANDIDATE_TEMPLATE = "[Candidate {i}]\n{text}\n[End of candidate {i}]"
PAIRWISE_TEMPLATE = """Which response answers the user prompt better? Consider helpfulness,
correctness and clarity.

[Prompt]
{prompt}

[Response A]
{a}

[Response B]
{b}

Reply with one letter only: A or B."""


def rubric_prompt(text, candidates):
    """The rubric request for one shown order; it ends with the prefilled start of the
    dictionary."""
    shown = [CANDIDATE_TEMPLATE.format(i=k + 1, text=c) for k, c in enumerate(candidates)]
    cands = "\n\n".join(shown)
    return RUBRIC_TEMPLATE.format(n=len(candidates), prompt=text, candidates=cands) + PREFILL


def pairwise_prompt(text, a, b):
    return PAIRWISE_TEMPLATE.format(prompt=text, a=a, b=b)


# ----------------------------------------------------------------------------- reading replies
def read_scores(text, n):
    """The rubric reply -> (n scores in 0..6, None) or (None, why): a failure (departure 8). The
    reply is read as the one document the judge wrote (reply.prefilled_object): text after that
    dictionary is kept raw and never read as the answer; a key given twice is a failure."""
    try:
        obj, _ = reply.prefilled_object(text, PREFILL)
    except reply.Unreadable as e:
        return None, f"the reply is not one dictionary: {e}"
    keys = {k for k in obj if re.fullmatch(r"id\d+_score", k)}
    vals = [obj.get(f"id{k}_score") for k in range(1, n + 1)]
    if keys != {f"id{k}_score" for k in range(1, n + 1)} or not all(
            type(v) is int and 0 <= v <= 6 for v in vals):  # bool is not a score
        return None, f"no integer id1_score..id{n}_score in 0..6 (and no others)"
    return [float(v) for v in vals], None


def parse_scores(text, n):
    return read_scores(text, n)[0]


verdict_letter = reply.verdict_letter  # 'A' / 'B' from a token (case, width, markup, space)


def verdict_prob(top):
    """Soft P(first response wins) from [(token, logprob), ...] at the verdict position, or None
    (no A/B, or most of the mass on other tokens)."""
    try:
        return reply.verdict(top)[0]
    except reply.Unreadable:
        return None


RERUN_HINT = ("a rerun re-asks outages; replies that arrived but could not be read are cached "
              "(billed) and asked again only with --retry_unreadable true")


def read_reply(data, kind, n):
    """A chat completion (decoded JSON) -> the cache value. Raises on a reply that is not a
    completion at all (retried); returns {"fail", "error", "raw"} for a completion that cannot be
    read (stored, billed)."""
    ch = data["choices"][0]
    text = ch["message"]["content"]
    if not isinstance(text, (str, type(None))):
        raise reply.Unreadable(f"content is a {type(text).__name__}")
    text = text or ""
    if kind == "rubric":
        scores, why = read_scores(text, n)
        if scores is None:
            return {"fail": "parse", "error": why, "raw": text, "scores": [None] * n}
        return {"scores": scores, "raw": text}
    lp = ch.get("logprobs") or {}
    pos = [p for p in lp.get("content") or [] if isinstance(p, dict)]
    if not pos:
        return {"fail": "no_verdict", "error": "no log-probs in the reply", "raw": text}
    # the verdict position: the first token that is not markup alone ('**', '"', ' ')
    pos = next((p for p in pos if re.search(r"\w", str(p.get("token")))), pos[0])
    top = {t.get("token"): t.get("logprob") for t in pos.get("top_logprobs") or []
           if isinstance(t, dict)}
    top = {pos.get("token"): pos.get("logprob"), **top}  # the sampled token may be missing
    try:
        p, why = reply.verdict([(t, v) for t, v in top.items()])
    except reply.Unreadable as e:
        p, why = None, str(e)
    if p is None:
        return {"fail": "no_verdict", "error": why, "raw": str(pos.get("token"))[:200]}
    return {"p": p, "raw": str(pos.get("token"))[:200]}


def make_judge(cfg):
    """train.py's flags -> (Config, fn or None): the run's judge, cached in OUT/judge_cache.jsonl
    and budgeted by OUT/judge_ledger.json. A bad judge, URL or missing key is refused here, before
    any work."""
    ocfg = Config(**{k: getattr(cfg, k) for k in RUN_FLAGS if hasattr(cfg, k)},
                  cache=os.path.join(cfg.out, "judge_cache.jsonl"),
                  ledger=os.path.join(cfg.out, "judge_ledger.json"),
                  refused=os.path.join(cfg.out, "judge_refused.json"))
    if ocfg.judge in ("rubric", "pairwise"):
        connect(ocfg.base_url, ocfg.api_key_env, ocfg.timeout, ocfg.max_reply_bytes)
        judging.check_judge(ocfg)  # --judge_model given, the price known under --max_usd
        return ocfg, None
    if ocfg.judge == "local":
        judging.check_judge(ocfg)
    return ocfg, None if ocfg.judge == "local" else judging.resolve(ocfg.judge)


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


def plan_item(item, cfg, fn, enc, judge_id, changes=None):
    """-> (units, truncated, cap): the requests one item needs as shown (1 for rubric / Python
    judges, n(n-1) ordered pairs otherwise), each keyed by a hash of (judge identity, template
    version, prompt, ordered candidates, decoding, and `changes`: what a refusing server is sent
    instead, judging.unit_key)."""
    prompt, cands = item["prompt"], list(item["candidates"])
    if fn is not None:
        ctx = judging.context_of(item) if judging.wants_context(fn) else {}
        return [{"key": judging.digest(judge_id, prompt, cands, ctx), "kind": "fn", "item": item,
                 "score_kind": judging.score_kind(fn)}], [], None
    text, rubric = prompt_text(prompt), cfg.judge == "rubric"
    if rubric:
        empty = rubric_prompt(text, [""] * len(cands))
    else:
        empty = pairwise_prompt(text, "", "")
    out = cfg.max_new_tokens if rubric else 1
    room = cfg.judge_context - count_tokens(enc, empty) - 10 - out  # departure 2
    per_request = len(cands) if rubric else 2
    cands, truncated, cap = fit(cands, enc, cfg.max_judge_tokens, room, per_request)
    # "extra_body": --judge_params's name when these keys were first written (caches stay valid)
    dec = {"temperature": cfg.temperature, "extra_body": cfg.judge_params, "max_tokens": out}

    def unit(kind, content, order):
        dec_u = {**dec, **({"top_logprobs": cfg.top_logprobs} if kind == "verdict" else {})}
        shown = [cands[k] for k in order]
        parts = (judge_id, TEMPLATE_VERSION, kind, text, shown, dec_u)
        return {"key": judging.unit_key(parts, changes), "parts": parts, "kind": kind,
                "pair": tuple(order), "n": len(cands), "max_tokens": out,
                "n_in": count_tokens(enc, content) + 10,  # + chat-format overhead
                "messages": [{"role": "user", "content": content}]}   # no system turn, as Fig. 3
    if rubric:
        units = [unit("rubric", rubric_prompt(text, cands), range(len(cands)))]
        return units, truncated, cap
    pairs = [(a, b) for a in range(len(cands)) for b in range(len(cands)) if a != b]
    units = [unit("verdict", pairwise_prompt(text, cands[a], cands[b]), (a, b))
             for a, b in pairs]
    return units, truncated, cap


# ----------------------------------------------------------------------------- assembly and audit
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
        res.update(scores=judging.nan_to_none(dno.winrates(P)), score_kind="winrate")
    if P is not None:
        np.fill_diagonal(P, 0.5)
        res["P"] = judging.nan_to_none(P)
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


# ----------------------------------------------------------------------------- asking
def judge_items(items, cfg, *, fn=None, progress=True):
    """Judge each {"id", "prompt", "candidates"} -> (results in the same order, summary)."""
    t0, fn = time.time(), judging.check_inputs(items, cfg, fn)
    api = fn is None and cfg.judge != "local"
    client, key = (connect(cfg.base_url, cfg.api_key_env, cfg.timeout, cfg.max_reply_bytes)
                   if api else (None, ""))
    price = judging.check_judge(cfg) if api or cfg.judge == "local" else None
    if api and cfg.judge_wait:
        chat_api.wait_ready(client, cfg.judge_wait)  # a server still loading: not an outage
    price = price if api else (0.0, 0.0)
    ledger = Ledger(price or (0.0, 0.0), cfg.max_usd, cfg.max_calls, cfg.ledger, durable=api)
    breaker = Breaker(cfg.breaker, ", ".join(chat_api.urls(cfg.base_url)) if api else cfg.judge)
    enc = encoder(cfg.judge_model, cfg.encoding, warn=bool(cfg.max_usd and price)) if api else None
    name = cfg.judge_model  # a local judge: a folder (by absolute path) or a hub id (as given)
    local = f"local:{os.path.abspath(name) if os.path.exists(name) else name}"
    judge_id = f"{host(cfg.base_url)}|{cfg.judge_model}" if api else local
    judge_id = judging.identity(fn) if fn else judge_id  # what the cache knows the judge by
    listwise = fn is not None or cfg.judge == "rubric"
    views = [(k, order, show(it, order)) for k, it in enumerate(items)
             for order in shown_orders(it, cfg, listwise)]
    if api:  # what this server refused before: the keys name what is sent
        client.refusals = chat_api.Refusals(cfg.refused, judge_id)
    changes = client.refusals.changes if api else None
    plans = [plan_item(v, cfg, fn, enc, judge_id, changes) for _, _, v in views]
    units = [u for units, _, _ in plans for u in units]
    values, hits = judging.answer(units, cfg, fn, (client, key), ledger, breaker, progress,
                                  read_reply=read_reply, verdict_prob=verdict_prob)
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
               "position": judging.position_bias(results, dno.winrates),
               "tokens_in": spent["tokens_in"], "tokens_out": spent["tokens_out"],
               "usd": spent["usd"], "run": ledger.totals(), "price_known": price is not None,
               "bad_usage": spent["bad_usage"],  # replies whose usage was billed at worst case
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


# ----------------------------------------------------------------------------- a run asks
def ask(run, items, what, audit=True):
    """The run's oracle (cached in OUT/judge_cache.jsonl, budgeted by OUT/judge_ledger.json for the
    whole run). More failures than --max_failure_rate: a one-line ValueError, nothing committed (a
    rerun re-asks only them). audit=False: no position audit (the evaluation already asks both
    orders)."""
    judge = run.judge if audit else replace(run.judge, position_audit=0.0)
    results, s = judge_items(items, judge, fn=run.fn, progress=True)
    # items need requests (1 per shown order for a listwise judge, n(n-1) pairs for a pairwise
    # one; identical requests of one batch share one answer); sent requests include the retries
    print0(f"judge: {s['items']} items ({s['ok']} ok) from {s['cache_hits'] + s['calls']} requests: "
           f"{s['cache_hits']} answered by the cache, {s['calls']} sent ({s['retries']} of them retries), "
           f"${s['usd']:.4f}")
    failed = 1 - s["ok"] / len(items) if items else 0.0  # nothing asked: nothing failed
    if failed > run.cfg.max_failure_rate:
        first = next((r["error"] for r in results if not r["ok"]), "")
        raise ValueError(f"{what}: {failed:.0%} of {len(items)} judgments failed (> --max_failure_rate "
                         f"{run.cfg.max_failure_rate}; first: {first}); nothing committed, the {s['ok']} answers are "
                         f"cached; {RERUN_HINT}")
    return [{k: v for k, v in r.items() if k != "cached"} for r in results], s


# ----------------------------------------------------------------------------- CLI
def main(argv=None):
    cfg = cli(Config, argv)
    try:
        check(cfg, limits=LIMITS)  # every flag before any work; credentials in a URL never echoed
        if cfg.judge in ("rubric", "pairwise"):
            chat_api.urls(cfg.base_url)
            judging.check_judge(cfg)
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
        items = judging.load_samples(cfg.samples)
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
          f"{s['run']['unsettled']} | usage distrusted {s['bad_usage']} | {s['seconds']}s")
    failed = [r for r in results if not r["ok"]]
    if len(failed) > cfg.max_failure_rate * len(results):
        sys.exit(f"error: {len(failed)} of {len(results)} items failed (> --max_failure_rate "
                 f"{cfg.max_failure_rate}; first: {failed[0]['error']}); {cfg.out} is written; "
                 f"{RERUN_HINT}")


if __name__ == "__main__":
    main()

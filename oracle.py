"""oracle.py -- preference judges P(y > y' | x) for DNO: cached, budgeted, fault-tolerant, order-randomised.

Usage:
  python oracle.py                                   # offline demo: synthetic judges on built-in items
  python oracle.py --judge synthetic --synthetic cyclic --samples s.jsonl --out j.jsonl
  python oracle.py --judge mymod:judge --samples s.jsonl --out j.jsonl     # your own function (see "fn judges")
  OPENAI_API_KEY=sk-... python oracle.py --judge rubric --model gpt-4-turbo --samples s.jsonl --out j.jsonl \
      --max_usd 5 --ledger run/ledger.json --position_audit 0.1     # the budget holds across reruns
  OPENAI_API_KEY=x python oracle.py --judge pairwise --base_url http://127.0.0.1:8080/v1 --model tiny \
      --extra_body '{"repeat_penalty": 1.0}' --samples s.jsonl --out j.jsonl     # llama.cpp / vLLM / Ollama
  python oracle.py --judge local --local_model DIR --judge_context 4096 --samples s.jsonl --out j.jsonl
Input lines {"id", "prompt" (text or chat messages), "samples": [...], "gold"?} (gold = the last candidate);
judge_items items: {"id", "prompt", "candidates", "gold_index"?, "shuffle"? (False: judge as given)}. Output lines
{"id", "prompt", "candidates", "gold_index", "ok", "error", "scores", "score_kind" ("rubric": 0..6 points |
"winrate": row means of P), "P", "disagreement", "cached", "order", "truncated", "max_judge_tokens", "rationale"
(rubric), "audit"?}, every per-candidate field in the ORIGINAL candidate order; then a summary (calls, retries,
cache hits, failures, order disagreement, "position" bias, tokens, dollars, "run": the ledger's totals). Failures
are never cached (--cache), so a rerun re-asks exactly them; --ledger makes --max_calls / --max_usd hold for a
whole run; --breaker failed requests in a row raise JudgeUnavailable. The API key is read from $OPENAI_API_KEY
(--api_key_env names the variable), never written anywhere, masked as *** if a server echoes it. HTTP, retries,
breaker, ledger and cache live in chat_api.py.

Judges: "rubric" (the paper's batched prompting, its Fig. 3: all K+1 candidates in one call, a short justification,
then an additive score out of 6 each as a dictionary), "pairwise" (one verdict token A/B, soft P from its top
log-probs, both orders averaged), "local" (the pairwise prompt on a local model.py Transformer), "synthetic"
(SYNTHETIC), or fn judges: fn(prompt_text, candidates) -> {"scores": [n]} or {"P": n x n}; a fn that also takes
`messages`, `gold`, `id` (or **kwargs) gets messages=<the raw chat list or None>, gold=<gold text or None>, id=.

Departures from the paper (numbered):
1. The rubric is our own wording of the paper's Fig. 3 (same six criteria, same output: one dictionary with a
   justification of at most ~100 words and a score per candidate, keys idK_justification / idK_score); the
   paper's judge is GPT-4-Turbo, ours any OpenAI-compatible endpoint. parse_scores also accepts {"K": s} and
   "Candidate K ... Score: s" answers. The paper's prompt also invites the judge to use web search; ours does not.
2. The pairwise and local judges are not in the paper (which ranks by rubric scores only); they give a soft
   P(y > y' | x) in [0, 1], the quantity Alg. 1 is written in, judged in both orders to cancel position bias.
3. For the rubric judge P[i][j] is 1/0.5/0 from comparing scores; "scores" of pairwise judges are win-rates.
4. Candidates are cut only when a request would not fit the judge's context (--judge_context): the room left
   after the prompt, template and answer is split evenly among the candidates of one request; --max_judge_tokens
   > 0 is a fixed cap instead. Cuts are listed in "truncated".
5. A failed judgment is explicit (ok=False, None entries) and is never turned into a winner or a zero.
6. Candidates are shown in a random order per item (seeded by --seed and the id; "order"), which the paper does not
   state; --position_audit judges a seeded share of items again in the reversed order (listwise judges only:
   pairwise ones see both orders of every pair already) and reports the bias:
   rank_disagreement = share of audited candidate pairs (i, j) whose outcome (i wins / tie / j wins) differs
   between the two orders; first_slot_advantage = mean over audited items of the mean over candidates whose slot
   differs of (win-rate among the item's candidates when shown earlier - when shown later), in [-1, 1].
"""
import hashlib, importlib, inspect, json, math, os, random, re, sys, threading, time
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

import dno
from chat_api import (PRICES, Breaker, BudgetExceeded, Cache, JudgeUnavailable, Ledger, OracleError, call, connect,
                      count_tokens, endpoint, fit, get_encoder, run_pool, truncate)
from cli import cli

TEMPLATE_VERSION = "dno-oracle-v3"  # bump when any template below changes: it is part of every cache key
SYSTEM = "You are a careful and impartial judge of answers written by AI assistants."
RUBRIC_TEMPLATE = """Below are a user prompt and {n} candidate responses written by AI assistants. Score every
candidate on its own, from the point of view of an AI assistant answering the user, with this additive 6-point
rubric: start at 0 and add one point for each criterion the candidate meets (use what you know to check facts).
1. It reads as an answer to the prompt: it does not loop or repeat itself, and it is not a continuation of the
   prompt or a list of unrelated examples.
2. It is relevant and gives some information that bears on the request.
3. It covers a substantial part of the request without rambling.
4. It answers nearly all of the request correctly, directly and usefully, with few errors or digressions.
5. It is entirely correct, with no errors and no made-up facts, and it answers every part of the request in a
   helpful, organised, focused and brief way.
6. It is correct and also concise, fitted to the request and expert: nothing in it is superfluous.

[Prompt]
{prompt}

{candidates}

For every candidate write a justification of at most 100 words, then its score. Return them all as one dictionary
with the keys "id<k>_justification" and "id<k>_score" for candidate k = 1..{n}:
{{"id1_justification": "...", "id1_score": <points>, ..., "id{n}_justification": "...", "id{n}_score": <points>}}"""
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
    judge: str = "rubric"          # rubric | pairwise | local | synthetic | module:function
    synthetic: str = "length"      # name in SYNTHETIC when judge == "synthetic"
    samples: str = ""              # CLI input: samples JSONL
    out: str = "judgments.jsonl"   # CLI output: judgments JSONL
    base_url: str = ""             # OpenAI-compatible endpoint; "" -> $OPENAI_BASE_URL or api.openai.com
    model: str = "gpt-4-turbo"     # judge model name sent to the endpoint
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the env var holding the key (the key itself is never stored)
    local_model: str = ""          # judge == "local": HF model folder or hub id ORG/NAME ("" -> --model)
    local_batch_size: int = 8      # prompts per forward pass of the local judge
    concurrency: int = 8           # requests in flight
    retries: int = 4               # retries per request on 429 / 5xx / timeouts / malformed replies (refused: 2)
    backoff: float = 0.5           # base seconds of exponential backoff (x2 per retry, with jitter)
    timeout: float = 60.0          # seconds per request
    breaker: int = 8               # stop after this many requests in a row failed by outage (5xx/timeout/conn.); 0=off
    max_judge_tokens: int = 0      # > 0: fixed cap on each candidate (tokens); 0: cut only to fit --judge_context
    judge_context: int = 128000    # tokens of the judge model's context window
    max_new_tokens: int = 1536     # cap on the rubric judge's own answer (K+1 justifications of <= 100 words)
    temperature: float = 0.0       # judge decoding temperature
    top_logprobs: int = 5          # alternatives read at the verdict token (pairwise)
    extra_body: str = ""           # JSON merged into each request, e.g. '{"repeat_penalty": 1.0}' for llama.cpp
    encoding: str = ""             # tiktoken encoding name or local .tiktoken file; "" -> by model, else cl100k_base
    cache: str = "judge_cache.jsonl"  # append-only JSONL cache; "" disables
    ledger: str = ""               # JSON file of the run's total spend; budgets apply to it across calls/resumes
    max_usd: float = 0.0           # hard budget in dollars (0 = none); the whole run's with --ledger
    max_calls: int = 0             # hard budget in requests sent (0 = none); the whole run's with --ledger
    prices: str = ""               # JSON price overrides {"model": [usd_in_per_1M, usd_out_per_1M]}
    shuffle: bool = True           # show each item's candidates in a seeded random order (departure 6)
    position_audit: float = 0.0    # share of items judged again in the reversed order to measure position bias
    seed: int = 0                  # seed of the candidate orders, the audit sample and the retry jitter


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
    Reads the last dictionary naming a candidate ({"id1_score": 5, ...} as Fig. 3 asks, or {"1": 5}; quotes optional;
    "idK_justification" values are skipped); without one,
    'Candidate 2: ... Score: 5', '**Candidate 2** ... 5/6', 'Score 2: 5', 'Score for candidate 2: 5'."""
    num = r"(\d+(?:\.\d+)?)"
    for block in reversed(re.findall(r"\{[^{}]*\}", text)):
        found = {}
        for k, v in re.findall(r"[\"']?(?:candidate\s*|id)?(\d+)(?:_score)?[\"']?\s*:\s*[\"']?" + num, block, re.I):
            found.setdefault(int(k), []).append(float(v))
        if set(found) & set(range(1, n + 1)):
            break
    else:
        found = {}
        head = re.compile(r"^[\s#*>\-\[]*(?:candidate|response)\s*#?\s*(\d+)\b", re.I | re.M)
        score = re.compile(r"score\s*(?:\(\s*0\s*-\s*6\s*\))?\s*[:=]?\s*\**\s*" + num  # "Score: 5", "score (0-6) = 5"
                           + r"|" + num + r"\s*(?:/|out of)\s*6", re.I)                # "5/6", "5 out of 6"
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
    """-> (client, key): chat_api.connect; fails fast (OracleError) on a missing key or a bad URL."""
    return connect(cfg.base_url, cfg.api_key_env, cfg.timeout)


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
    from model import Transformer
    from model_io import ModelError, load_tokenizer, resolve_model
    try:  # a folder, or a hub id ORG/NAME -> its cached snapshot, as transformers resolves it
        path = resolve_model(cfg.local_model or cfg.model, what="--local_model")
        tok, model = load_tokenizer(path), Transformer.from_pretrained(path).eval()
    except ModelError as e:  # main() reports OracleErrors in one line
        raise OracleError(str(e)) from None
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


# ----------------------------------------------------------------------------- fn judges
def load_fn(spec):
    """'module:function' -> your judge function; a one-line OracleError when it cannot be found."""
    mod, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except ImportError as e:
        raise OracleError(f"--judge {spec!r}: cannot import module {mod!r} ({e})") from None
    except AttributeError:
        raise OracleError(f"--judge {spec!r}: module {mod!r} has no attribute {name!r}") from None
    except Exception as e:                               # the module itself is broken: say where, in one line
        where = f" ({e.filename}:{e.lineno})" if isinstance(e, SyntaxError) else ""
        raise OracleError(f"--judge {spec!r}: importing {mod!r} failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}{where}") from None
    if not callable(fn):
        raise OracleError(f"--judge {spec!r}: {name!r} is not callable")
    return fn


def wants_context(fn):
    """True when fn takes messages= / gold= / id= (or **kwargs) besides (prompt, candidates)."""
    try:
        ps = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind == p.VAR_KEYWORD or p.name in ("messages", "gold", "id") for p in ps)


def context_of(item):
    """The extra keyword arguments a fn judge may take, for the candidates as shown."""
    g, raw = item.get("gold_index"), item["prompt"]
    return {"messages": raw if isinstance(raw, list) else None,
            "gold": None if g is None else item["candidates"][g], "id": item["id"]}


def run_fn(pending, fn, ledger, done):
    """A fn judge: one call per shown item, its answer checked for shape."""
    more = wants_context(fn)
    for u in pending:
        ledger.spend(0, 0)
        it, n = u["item"], len(u["item"]["candidates"])
        args = (prompt_text(it["prompt"]), list(it["candidates"]))
        v = fn(*args, **context_of(it)) if more else fn(*args)
        if not isinstance(v, dict) or not (len(v.get("scores") or []) == n or len(v.get("P") or []) == n):
            raise OracleError(f"judge {fn.__name__} returned {str(v)[:60]}; want {{'scores': [n]}} or {{'P': n x n}}")
        done(u, v)


# ----------------------------------------------------------------------------- judging items
def shown_orders(item, cfg, listwise):
    """-> [main order, reversed order if audited]; order[k] = original index of the candidate in slot k. Only
    listwise judges (rubric, fn) are audited: pairwise ones already see every pair in both orders."""
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


def plan_item(item, cfg, fn, enc, judge_id):
    """-> (units, truncated, cap): the requests one item needs as shown (1 for rubric/fn, n(n-1) ordered pairs
    otherwise), each keyed by a content hash of (judge, template version, prompt, ordered candidates, decoding)."""
    prompt, cands = item["prompt"], list(item["candidates"])
    h = lambda *parts: hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    if fn is not None:
        ctx = context_of(item) if wants_context(fn) else {}
        return [{"key": h(judge_id, TEMPLATE_VERSION, prompt, cands, ctx), "kind": "fn", "item": item}], [], None
    text, dec = prompt_text(prompt), {"temperature": cfg.temperature, "extra_body": cfg.extra_body}
    rubric = lambda cs: RUBRIC_TEMPLATE.format(n=len(cs), prompt=text, candidates="\n\n".join(
        CANDIDATE_TEMPLATE.format(i=k + 1, text=c) for k, c in enumerate(cs)))
    pair = lambda a, b: PAIRWISE_TEMPLATE.format(prompt=text, a=a, b=b)
    empty = rubric([""] * len(cands)) if cfg.judge == "rubric" else pair("", "")
    out = cfg.max_new_tokens if cfg.judge == "rubric" else 1
    room = cfg.judge_context - count_tokens(enc, SYSTEM + empty) - 10 - out  # departure 4
    cands, truncated, cap = fit(cands, enc, cfg.max_judge_tokens, room, len(cands) if cfg.judge == "rubric" else 2)

    def unit(kind, content, order):
        dec_u = {**dec, "max_tokens": out, **({"top_logprobs": cfg.top_logprobs} if kind == "verdict" else {})}
        return {"key": h(judge_id, TEMPLATE_VERSION, kind, text, [cands[k] for k in order], dec_u), "kind": kind,
                "pair": tuple(order), "n": len(cands), "max_tokens": out,
                "n_in": count_tokens(enc, SYSTEM + content) + 10,  # + chat-format overhead
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]}
    if cfg.judge == "rubric":
        return [unit("rubric", rubric(cands), range(len(cands)))], truncated, cap
    return [unit("verdict", pair(cands[a], cands[b]), (a, b)) for a in range(len(cands))
            for b in range(len(cands)) if a != b], truncated, cap


def nan_to_none(x):
    return [nan_to_none(v) for v in x] if isinstance(x, (list, np.ndarray)) else None if math.isnan(x) else float(x)


def assemble(item, units, values, why):
    """Cache values of one shown item's units -> the contract's result dict in shown order (P[i][j] = P(i > j))."""
    n, vals = len(item["candidates"]), [values.get(u["key"]) for u in units]
    res = {"id": item["id"], "ok": False, "error": None, "scores": None, "P": None, "disagreement": None,
           "cached": all(v is not None and v.get("_cached") for v in vals)}
    if any(v is None for v in vals):
        return {**res, "error": f"not judged: {why}"}
    first, fails = vals[0], [v for v in vals if "fail" in v]
    if "scores" in first or units[0]["kind"] == "rubric":  # P[i][j] from comparing scores (departure 3)
        s = first.get("scores")
        P = None if s is None else dno.table_from_scores(s)
        res.update(scores=s, score_kind="rubric", rationale=first.get("raw"))
    else:
        if units[0]["kind"] == "fn":
            P = np.array(first["P"], dtype=float)  # (n, n), None -> NaN
        else:  # both orders of each pair, averaged: P(i > j) = (p(i first wins) + 1 - p(j first wins)) / 2
            p = {u["pair"]: np.nan if v.get("p") is None else v["p"] for u, v in zip(units, vals)}
            P = np.array([[0.5 if i == j else (p[i, j] + 1 - p[j, i]) / 2 for j in range(n)] for i in range(n)])
            both = [(p[i, j], p[j, i]) for i in range(n) for j in range(i + 1, n) if not np.isnan(p[i, j] + p[j, i])]
            # the two orders disagree when both say "first wins" or both say "second wins"
            res["disagreement"] = sum((a - .5) * (b - .5) > 0 for a, b in both) / len(both) if both else None
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
    """Shown order -> original order: the candidate in slot k is the original candidate order[k]."""
    slot = sorted(range(len(order)), key=order.__getitem__)  # slot[i]: where original candidate i was shown
    if res["scores"] is not None:
        res["scores"] = [res["scores"][slot[i]] for i in range(len(order))]
    if res["P"] is not None:
        res["P"] = [[res["P"][slot[i]][slot[j]] for j in range(len(order))] for i in range(len(order))]
    return {**res, "order": list(order), "truncated": sorted(order[k] for k in truncated)}


def position_bias(results):
    """The summary's "position" block over the items judged in both orders (definitions: departure 6)."""
    audited = [r for r in results if "audit" in r and r["P"] is not None and r["audit"]["P"] is not None]
    flips, pairs, adv = 0, 0, []
    for r in audited:
        A, B = np.array(r["P"], dtype=float), np.array(r["audit"]["P"], dtype=float)  # (n, n), NaN unknown
        known = [(i, j) for i in range(len(A)) for j in range(i + 1, len(A)) if not np.isnan(A[i, j] + B[i, j])]
        flips += sum(np.sign(A[i, j] - .5) != np.sign(B[i, j] - .5) for i, j in known)  # i wins / tie / j wins
        pairs += len(known)
        w1, w2 = dno.winrates(A), dno.winrates(B)  # (n,) win-rates among the item's candidates
        s1, s2 = [r["order"].index(i) for i in range(len(A))], [r["audit"]["order"].index(i) for i in range(len(A))]
        d = [(w1[i] - w2[i]) * (1 if s1[i] < s2[i] else -1) for i in range(len(A)) if s1[i] != s2[i]]
        d = [x for x in d if not np.isnan(x)]  # earlier minus later, per candidate
        adv += [sum(d) / len(d)] if d else []
    return {"items": len(audited), "rank_disagreement": flips / pairs if pairs else None,
            "first_slot_advantage": sum(adv) / len(adv) if adv else None}


def check_inputs(items, cfg, fn):
    """-> the fn judge to use (or None); a one-line OracleError for any user mistake."""
    if fn is None and cfg.judge == "synthetic":
        if cfg.synthetic not in SYNTHETIC:
            raise OracleError(f"unknown --synthetic {cfg.synthetic!r}; choose from {sorted(SYNTHETIC)}")
        fn = SYNTHETIC[cfg.synthetic]
    if fn is None and ":" in cfg.judge:
        fn = load_fn(cfg.judge)
    if fn is None and cfg.judge not in ("rubric", "pairwise", "local"):
        raise OracleError(f"unknown --judge {cfg.judge!r}; choose rubric, pairwise, local, synthetic or module:fn")
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


def run_api(pending, cfg, ledger, breaker, done):
    """Bounded concurrency: cfg.concurrency threads; `done` caches each answer as soon as it lands (in the
    worker), so an interrupt, a budget stop or a tripped breaker loses at most the requests in flight."""
    (client, key), extra = make_client(cfg), json.loads(cfg.extra_body or "{}")

    def work(u):  # one judge request through chat_api.call: retries, budget, breaker, key scrubbing
        body = dict(model=cfg.model, messages=u["messages"], max_tokens=u["max_tokens"], temperature=cfg.temperature,
                    **extra)
        if u["kind"] == "verdict":
            body.update(logprobs=True, top_logprobs=max(1, cfg.top_logprobs))  # llama.cpp needs top_logprobs >= 1
        done(u, call(client, key, body, lambda data: read_reply(data, u), ledger, breaker, n_in=u["n_in"],
                     max_out=u["max_tokens"], retries=cfg.retries, backoff=cfg.backoff, seed=f"{cfg.seed}:{u['key']}"))
    run_pool(work, pending, cfg.concurrency)


def judge_items(items, cfg, *, fn=None, progress=True):
    """Judge each {"id", "prompt", "candidates"} -> (results in the same order, summary). See module docstring."""
    from tqdm import tqdm
    t0, fn = time.time(), check_inputs(items, cfg, fn)
    api = fn is None and cfg.judge != "local"
    price = {**PRICES, **json.loads(cfg.prices or "{}")}.get(cfg.model) if api else (0.0, 0.0)
    if price is None and cfg.max_usd:
        raise OracleError(f"no price known for model {cfg.model!r}: pass --prices '{{\"{cfg.model}\": [in, out]}}'")
    ledger = Ledger(price or (0.0, 0.0), cfg.max_usd, cfg.max_calls, cfg.ledger, durable=api)
    breaker = Breaker(cfg.breaker, endpoint(cfg.base_url) if api else cfg.judge)
    enc = encoder_for(cfg) if api else None  # local: ~4 chars/token
    name = cfg.local_model or cfg.model                      # a folder (by absolute path) or a hub id (as given)
    local = f"local:{os.path.abspath(name) if os.path.exists(name) else name}"
    judge_id = f"fn:{fn.__name__}" if fn else cfg.model if api else local
    listwise = fn is not None or cfg.judge == "rubric"
    views = [(k, order, show(it, order)) for k, it in enumerate(items) for order in shown_orders(it, cfg, listwise)]
    plans = [plan_item(v, cfg, fn, enc, judge_id) for _, _, v in views]
    cache, values, pending, lock = Cache(cfg.cache), {}, {}, threading.Lock()
    for u in (u for units, _, _ in plans for u in units):
        if u["key"] in cache.data:
            values[u["key"]] = {**cache.data[u["key"]], "_cached": True}
        else:
            pending.setdefault(u["key"], u)
    hits, pending = sum(u["key"] in values for units, _, _ in plans for u in units), list(pending.values())
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
            run_api(pending, cfg, ledger, breaker, done)
    except (BudgetExceeded, JudgeUnavailable):
        pass  # ledger.stopped / breaker.tripped hold the reason; everything answered so far is in the cache
    finally:
        bar.close()
        cache.close()
        ledger.save()
    why = "judge unavailable" if breaker.tripped else "budget exhausted"
    results = [None] * len(items)
    for (k, order, view), (units, tr, cap) in zip(views, plans):
        r = unshuffle(assemble(view, units, values, why), order, tr)
        if results[k] is None:
            results[k] = {**r, "max_judge_tokens": cap}
        else:  # the position audit: the same item in the reversed order
            results[k]["audit"] = {x: r[x] for x in ("order", "ok", "scores", "P")}
    dis = [r["disagreement"] for r in results if r["disagreement"] is not None]
    spent = ledger.session()
    summary = {"items": len(items), "ok": sum(r["ok"] for r in results), **{k: spent[k] for k in ("calls", "retries")},
               "cache_hits": hits, "failures": dict(Counter(v["fail"] for v in values.values() if "fail" in v)),
               "order_disagreement": sum(dis) / len(dis) if dis else None, "position": position_bias(results),
               **{k: spent[k] for k in ("tokens_in", "tokens_out", "usd")}, "run": ledger.totals(),
               "price_known": price is not None, "truncated": sum(len(r["truncated"]) for r in results),
               "seconds": round(time.time() - t0, 3)}
    tail = f"; {summary['ok']}/{len(items)} items judged and cached"
    if breaker.tripped:
        raise JudgeUnavailable(breaker.tripped + tail + " (rerun to re-ask the rest)", results, summary)
    if ledger.stopped:
        raise BudgetExceeded(f"budget exhausted: {ledger.stopped}{tail} (rerun with a larger budget to resume)",
                             results, summary)
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
    except (BudgetExceeded, JudgeUnavailable) as e:
        print(json.dumps({"summary": e.summary}), file=sys.stderr)
        sys.exit(f"error: {e}")
    except (OracleError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"judged {s['items']} items ({s['ok']} ok) | calls {s['calls']} (retries {s['retries']}) | cache hits "
          f"{s['cache_hits']} | failures {s['failures']} | order disagreement {s['order_disagreement']} | position "
          f"{s['position']} | tokens "
          f"{s['tokens_in']} in / {s['tokens_out']} out | ${s['usd']:.4f} | {s['seconds']}s")


if __name__ == "__main__":
    main()

"""judges.py -- what a judge says: the paper's rubric, the pairwise verdict, and the Python judges.

Usage:
  python judges.py                            # the Python judges on two items; a rubric reply read
  import judges; fn = judges.resolve("demo")           # an alias, or any "module:function"
  judges.parse_scores('{"id1_justification": "ok", "id1_score": 5}', 1)   # -> [5.0]

The rubric (Fig. 3) and the pairwise verdict with their replies read as data, the local-model
judge, and the Python judges, all named in one registry. oracle.py asks them.

The judge contract (a Python judge, --judge module:function): fn(prompt_text, candidates) ->
  {"scores": [n numbers]} or {"P": n x n, P[i][j] = P(i beats j)}; a fn that also takes `messages`,
  `gold`, `id` (or **kwargs) gets messages=<the raw chat list or None>, gold=<gold text or None>,
  id=<the item id>. fn.score_kind declares what its scores mean: "rubric" (the default for
  "scores": points 0..6, the paper's pair rule) or "winrate" (in [0, 1], always so for "P"); a
  score outside the declared range is refused in one line. The cache knows a Python judge by its
  module and a hash of the module's source, so an edited judge is asked again.

Departures from the paper (numbered):
1. The rubric is our wording of Fig. 3, point by point and in its order (a first point, a second,
   "add a third point", "award a fourth point", ...), keeping the clauses that carry its meaning:
   point 2 "even if it is incomplete or contains some irrelevant content", point 3 "but does not
   completely resolve the query or provide a direct answer", point 4's "extraneous content, or
   excess wordiness" (the paper's only length penalty), and point 6 in full (tailored, no
   extraneous information, expert, high quality, engaging and insightful).
2. Fig. 3's prompt invites the judge to use web search; ours does not. The paper's judge is
   GPT-4-Turbo; ours is any OpenAI-compatible endpoint.
3. Fig. 3 closes with the "Score:" line and prefills the start of the answer dictionary in the
   assistant's turn. Chat APIs cannot prefill the assistant turn, so the prompt ends with the
   dictionary's start (PREFILL) and the reply is read either as a whole dictionary or as the rest
   of the prefilled one; each justification ends with its "Score: <points>" line, and the integer
   under "idK_score" is what counts.
4. The reply is parsed as JSON and validated (exactly the keys id1_score..idn_score, integers
   0..6); anything else is a failed judgment with the raw reply kept, never a default score. Two
   valid dictionaries in one reply (e.g. one quoted from a candidate) are a failure too, so no
   candidate's text can set another one's score.
5. The pairwise and local judges are not in the paper (it ranks by rubric scores only); they give a
   soft P(y > y' | x) from the verdict token's log-probs.
"""
import hashlib
import importlib
import inspect
import json
import math
import re
import sys

TEMPLATE_VERSION = "dno-judges-v4"  # bump when a template below changes: it is in every cache key
SYSTEM = "You are a careful and impartial judge of answers written by AI assistants."
PREFILL = '{"id1_justification": "'  # the start of the answer dictionary (departure 3)
RUBRIC_TEMPLATE = """Review the user's prompt and the {n} candidate responses below with the
additive 6-point scoring system described here, scoring every candidate on its own. Points
accumulate in order: start at 0 and stop at the first criterion a candidate does not meet.
- Give 1 point if the response reads as an answer: it does not loop or repeat itself, and it is
  not a continuation of the prompt or a list of unrelated examples.
- Add a second point if the response is relevant and gives some information related to the user's
  request, even if it is incomplete or contains some irrelevant content.
- Add a third point if the response addresses a substantial portion of the user's request, but
  does not completely resolve the query or provide a direct answer.
- Award a fourth point if the response answers the basic elements of the request directly and
  usefully, with few errors, extraneous content, or excess wordiness.
- Award a fifth point if the response is written from an AI assistant's point of view, answers the
  request directly and completely, is well organised and helpful, and has no errors or made-up
  facts, even if it could be slightly clearer, more concise or more focused.
- Award a sixth point if the response is impeccably tailored to the request, has no extraneous
  information, reflects expert knowledge, and is a high-quality, engaging and insightful answer.

[Prompt]
{prompt}

{candidates}

After examining the prompt and the candidates, justify the total of each candidate in at most 100
words, ending its justification with the line "Score: <points>". Reply with one JSON dictionary and
nothing else, with the keys "id<k>_justification" and "id<k>_score" (an integer from 0 to 6) for
candidate k = 1..{n}:
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


def prompt_text(prompt):
    """A prompt is a string or a list of chat messages; the judge sees it as text."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


# ----------------------------------------------------------------------------- reading replies
def score_dicts(text):
    """Every JSON object in text that starts at a '{' outside any decoded object's span (json, not
    regex)."""
    dec, found, k = json.JSONDecoder(strict=False), [], text.find("{")  # raw newlines allowed
    while k >= 0:
        try:
            obj, end = dec.raw_decode(text, k)
        except ValueError:
            end = k + 1
        else:
            if isinstance(obj, dict):
                found.append(obj)
        k = text.find("{", end)
    return found


def valid_scores(obj, n):
    """A Fig. 3 dictionary -> n floats, or None unless its scores are exactly id1..idn, integers in
    0..6."""
    keys = {k for k in obj if re.fullmatch(r"id\d+_score", k)}
    if keys != {f"id{k}_score" for k in range(1, n + 1)}:
        return None
    vals = [obj[f"id{k}_score"] for k in range(1, n + 1)]
    if not all(type(v) is int and 0 <= v <= 6 for v in vals):  # bool is not a score
        return None
    return [float(v) for v in vals]


def parse_scores(text, n):
    """The rubric reply -> n scores in 0..6, or None (a failure: departure 4). The reply is one
    dictionary, alone or after prose, or the rest of the prefilled one (PREFILL + reply)."""
    for whole in (text, PREFILL + text):
        good = [s for s in (valid_scores(d, n) for d in score_dicts(whole)) if s is not None]
        if len(good) == 1:
            return good[0]
        if len(good) > 1:
            return None  # a second dictionary (e.g. quoted from a candidate): ambiguous
    return None


def verdict_letter(token):
    """'A' / 'B' when a verdict token says it ('A', ' B', 'A.', '**B', '\u2581A'), else None
    ('Both', 'a')."""
    m = re.fullmatch(r"[\W_]*([AB])[\W_]*", token.replace("\u2581", " "))
    return m.group(1) if m else None


def verdict_prob(top):
    """Soft P(first response wins) from [(token, logprob), ...] at the verdict position: mass on A
    over mass on A or B. None when neither letter is listed."""
    mass = {"A": 0.0, "B": 0.0}
    for tok, lp in top:
        v = verdict_letter(tok)
        if v:
            mass[v] += math.exp(lp)
    tot = mass["A"] + mass["B"]
    return mass["A"] / tot if tot > 0 else None


def read_reply(data, kind, n):
    """A chat completion (decoded JSON) -> the cache value. Raises on a reply that is not a
    completion at all (retried); returns {"fail", "error", "raw"} for a completion that cannot be
    read (stored, billed)."""
    ch = data["choices"][0]
    if kind == "rubric":
        text = ch["message"]["content"]
        scores = parse_scores(text, n)
        if scores is None:
            why = f"no valid dictionary with integer id1_score..id{n}_score in 0..6"
            return {"fail": "parse", "error": why, "raw": text, "scores": [None] * n}
        return {"scores": scores, "raw": text}
    lp = ch.get("logprobs") or {}
    if not lp.get("content"):
        why = "no log-probs in the reply"
        return {"fail": "no_verdict", "error": why, "raw": ch["message"]["content"]}
    pos = lp["content"][0]  # the verdict token position
    top = {t["token"]: t["logprob"] for t in pos.get("top_logprobs") or []}
    top = {pos["token"]: pos["logprob"], **top}  # the sampled token may be missing from top
    p = verdict_prob(list(top.items()))
    if p is None:
        why = f"no A/B among the top log-probs (got {pos['token']!r})"
        return {"fail": "no_verdict", "error": why, "raw": pos["token"]}
    return {"p": p, "raw": pos["token"]}


# ------------------------------------------------------------------------- the local-model judge
def run_local(units, model_dir, batch_size, ledger, done):
    """The pairwise prompt on a local model.py Transformer: P(A) from the next-token log-softmax
    over the verdict letters, batches left-padded. model_dir: a folder or a hub id ORG/NAME
    (--judge_model)."""
    import torch
    from dnolib.ledger import OracleError
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
ALIASES = {"length": "judges:length_judge", "overlap": "judges:overlap_judge",
           "cyclic": "judges:cyclic_judge", "demo": "demo.task:demo",
           "demo_cyclic": "demo.task:demo_cyclic", "demo_rps": "demo.task:demo_rps",
           "demo_bt": "experiments.compare_bt:demo_bt"}
API_JUDGES = ("rubric", "pairwise", "local")  # asked over HTTP or run on a local model
SCORE_RANGE = {"rubric": (0.0, 6.0), "winrate": (0.0, 1.0)}


def resolve(name):
    """--judge NAME -> the Python judge function (an alias or module:function); a one-line
    OracleError."""
    from dnolib.ledger import OracleError
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
    from dnolib.ledger import OracleError
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


if __name__ == "__main__":
    items = [("pick", ["rock", "paper cuts", "scissors cut it"]),
             ("say hi", ["hi", "hi there, friend"])]
    for name in ("length", "overlap", "cyclic"):
        fn = resolve(name)
        print(f"{name:8s} ({score_kind(fn)})", [fn(p, c) for p, c in items])
    reply = ('Both answer.\nScore: 5", "id1_score": 5, '
             '"id2_justification": "Loops.\\nScore: 1", "id2_score": 1}')
    print("prefilled reply ->", parse_scores(reply, 2))

"""reply.py: reading what a judge server sent without trusting any of it -- one JSON document read
from its start (linear time, duplicate keys refused), verdict tokens normalised, log-probs and
token counts checked before they reach a verdict or the ledger.

    from dnolib import reply
    obj, rest = reply.first_object('{"a": 1} and a remark')   # ({'a': 1}, ' and a remark')
    reply.verdict_letter("\uff21")                             # 'A' (fullwidth, NFKC)
    reply.billable({"usage": {...}}, n_in, max_out)            # ((tokens in, out), why or None)

Every function here raises only Unreadable (a ValueError with a one-line message) on bad input:
chat_api.call turns it into a failure class with the raw text kept, never a traceback.
"""
import json
import math
import re
import unicodedata
from collections import Counter


class Unreadable(ValueError):
    """A reply that arrived but cannot be read (one line)."""


def unique_keys(pairs):
    """object_pairs_hook: a key given twice is refused (json would silently keep the last)."""
    twice = [k for k, c in Counter(k for k, _ in pairs).items() if c > 1]
    if twice:
        raise Unreadable(f"key {twice[0][:40]!r} given twice")
    return dict(pairs)


DECODER = json.JSONDecoder(strict=False, object_pairs_hook=unique_keys)  # raw newlines allowed


def first_object(text):
    """-> (the JSON object that text starts with (after blanks), the text after it, kept raw).
    One decode from the start: linear in len(text); too deep a nesting is Unreadable, not a
    RecursionError."""
    start = len(text) - len(text.lstrip(BLANKS))
    try:
        obj, end = DECODER.raw_decode(text, start)
    except Unreadable:
        raise
    except RecursionError:
        raise Unreadable("JSON nested too deeply") from None
    except ValueError as e:
        raise Unreadable(f"not JSON ({str(e)[:80]})") from None
    if not isinstance(obj, dict):
        raise Unreadable(f"a JSON {type(obj).__name__}, not an object")
    return obj, text[end:]


BLANKS = " \t\r\n\ufeff"  # whitespace and a byte-order mark
FENCE = re.compile(r"[\s\ufeff]*```[A-Za-z]*[ \t]*\n")  # a markdown code fence before the dictionary


def prefilled_object(text, prefill):
    """The reply to a prompt that ends with `prefill` (the start of a dictionary) read as the one
    document the judge wrote: the reply alone when it starts a dictionary itself (after blanks or
    a ``` fence), else prefill + reply. -> (object, text after it). Nothing after the first
    object, and nothing a reply quotes before it, can be read as the answer."""
    fence = FENCE.match(text)
    alone = text[fence.end():] if fence else text
    if alone.lstrip(BLANKS).startswith("{"):
        try:
            return first_object(alone)
        except Unreadable:
            pass  # a continuation whose first justification starts with "{"
    return first_object(prefill + text)


def document(raw):
    """The HTTP body (bytes) -> the decoded JSON object; Unreadable otherwise."""
    text = raw.decode("utf-8", "replace")
    obj, rest = first_object(text)
    if rest.strip():
        raise Unreadable("text after the JSON body")
    return obj


# ----------------------------------------------------------------------------- the verdict
MARKERS = str.maketrans({"\u2581": " ", "\u0120": " "})  # SentencePiece / byte-BPE space marks


def verdict_letter(token):
    """'A' / 'B' when a verdict token says it, whatever its case, width (NFKC: fullwidth, math
    bold), markup ('**', quotes, brackets, '.') and leading space; else None ('Both', 'Answer')."""
    if not isinstance(token, str):
        return None
    t = unicodedata.normalize("NFKC", token).translate(MARKERS)
    m = re.fullmatch(r"[\W_]*([ABab])[\W_]*", t)
    return m.group(1).upper() if m else None


def logprob(x):
    """A log-prob from the wire -> a float <= 0; Unreadable for NaN, +inf, a string or a
    positive value (rounding up to 1e-3 is clamped to 0)."""
    if type(x) not in (int, float) or math.isnan(x) or x > 1e-3:
        raise Unreadable(f"log-prob {str(x)[:20]!r} is not a number <= 0")
    return min(float(x), 0.0)


def verdict(top):
    """[(token, logprob), ...] at the verdict position -> (P(first response wins) or None, why).
    P = mass on A / mass on A or B; None when no letter is listed or a token that is neither
    outweighs both letters together: the model's likeliest answer is something else ('**',
    'Answer', a look-alike), and a certain verdict read off a small 'B' beside it would be wrong.
    Mass spread thinly over many other tokens leaves the verdict soft, as it is."""
    mass, other = {"A": 0.0, "B": 0.0}, {}
    for tok, lp in top:
        v, p = verdict_letter(tok), math.exp(logprob(lp))
        if v:
            mass[v] += p
        else:
            other[tok] = other.get(tok, 0.0) + p
    known = mass["A"] + mass["B"]
    rival, most = max(other.items(), key=lambda kv: kv[1], default=(None, 0.0))  # token may be None
    if known == 0 or most >= known:
        return None, ("no A / B among the top log-probs" if known == 0 else
                      f"the likeliest token {str(rival)[:20]!r} ({most:.2f}) is neither A nor B, "
                      f"which have {known:.2f}")
    return mass["A"] / known, None


# ----------------------------------------------------------------------------- the bill
def billable(data, n_in, max_out):
    """The tokens to bill for a 200 -> ((in, out), None), or the reserved worst case (n_in,
    max_out) with why when the reply's usage is missing or not believable: each count must be a
    non-negative integer, prompt_tokens <= 8 n_in + 4096 (tokenizers differ from our estimate)
    and completion_tokens <= 2 max_out + 64 (the server was told max_out)."""
    u = data.get("usage") if isinstance(data, dict) else None
    if u is None:
        return (n_in, max_out), None  # no usage at all: the worst case, as reserved
    vals = [u.get("prompt_tokens"), u.get("completion_tokens")] if isinstance(u, dict) else []
    ok = (len(vals) == 2 and all(type(v) is int and v >= 0 for v in vals)
          and vals[0] <= 8 * n_in + 4096 and vals[1] <= 2 * max_out + 64)
    if not ok:
        return (n_in, max_out), f"usage {json.dumps(u)[:80]} is not believable"
    return (vals[0], vals[1]), None

"""chat_api.py -- a small client for OpenAI-compatible chat-completions endpoints: pooled keep-alive HTTP, retries,
a circuit breaker for outages, a token and dollar ledger with a hard budget (optionally persistent, so the budget
holds for a whole run across calls and resumes), an append-only JSONL cache. It knows nothing about preferences;
oracle.py builds the judges on it.

Usage:
  OPENAI_API_KEY=x python chat_api.py --base_url http://127.0.0.1:8080/v1 --model tiny "Say hi"   # one request

Transport: the `openai` package (any OpenAI-compatible server: OpenAI, vLLM, llama.cpp, Ollama; its proxy and TLS
settings apply). We call its low-level post() and read the raw bytes: on a 2-core machine shared with the server it
judges, building the package's typed response objects cost more CPU per request than the rest of this client.
Retries are ours (max_retries=0 in the package) so that every failure is counted and none becomes a winner.
"""
import json, math, os, random, sys, threading, time, warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import lru_cache

# USD per 1M tokens (input, output); oracle.py's --prices '{"model": [in, out]}' overrides or extends it
PRICES = {"gpt-4-turbo": (10.0, 30.0), "gpt-4o": (2.5, 10.0), "gpt-4o-mini": (0.15, 0.6),
          "gpt-4.1": (2.0, 8.0), "gpt-4.1-mini": (0.4, 1.6)}


class BudgetExceeded(RuntimeError):
    """--max_usd / --max_calls hit; everything judged so far is in the cache. Carries .results, .summary."""
    def __init__(self, msg, results=None, summary=None):
        super().__init__(msg)
        self.results, self.summary = results, summary


class OracleError(ValueError):
    """A user/setup mistake with a one-line message (CLIs print it and exit)."""


class JudgeUnavailable(OracleError):
    """The circuit breaker tripped: the endpoint failed `breaker` requests in a row. Carries .results, .summary."""
    def __init__(self, msg, results=None, summary=None):
        super().__init__(msg)
        self.results, self.summary = results, summary


# ----------------------------------------------------------------------------- tokens and money
@lru_cache(maxsize=None)
def get_encoder(spec):
    """tiktoken encoder from a name or a local .tiktoken file (lines 'base64token rank'); None, with ONE warning,
    when unavailable (named encodings download their BPE file on first use and fail offline)."""
    import base64, tiktoken
    try:
        if os.path.isfile(spec):
            with open(spec) as f:
                ranks = {base64.b64decode(t): int(r) for t, r in (ln.split() for ln in f if ln.strip())}
            return tiktoken.Encoding(os.path.basename(spec), pat_str=r"\s?\w+|\s?[^\w\s]+|\s+",
                                     mergeable_ranks=ranks, special_tokens={})
        return tiktoken.get_encoding(spec)
    except Exception as e:
        warnings.warn(f"tiktoken encoding {spec!r} unavailable ({type(e).__name__}); "
                      "token counts are approximate (len(text) / 4)", stacklevel=2)
        return None


def count_tokens(enc, text):
    return len(enc.encode(text, disallowed_special=())) if enc else math.ceil(len(text) / 4)


def truncate(enc, text, max_tokens):
    """-> (text cut to at most max_tokens tokens, was_truncated)"""
    if enc is None:
        return (text, False) if len(text) <= 4 * max_tokens else (text[:4 * max_tokens], True)
    ids = enc.encode(text, disallowed_special=())
    return (text, False) if len(ids) <= max_tokens else (enc.decode(ids[:max_tokens]), True)


def fit(texts, enc, cap, room, per_request):
    """Texts that share requests of `per_request` texts each -> (texts, indices cut, cap used or None).
    cap > 0: a fixed cap. Else cut only when the largest request would pass `room` tokens, each text to an even
    share of it."""
    if cap <= 0:
        if sum(sorted((count_tokens(enc, t) for t in texts), reverse=True)[:per_request]) <= room:
            return texts, [], None
        cap = max(1, room // per_request)
    cut = [truncate(enc, t, cap) for t in texts]
    return [t for t, _ in cut], [i for i, (_, was) in enumerate(cut) if was], cap


TOTALS = ("calls", "retries", "tokens_in", "tokens_out", "usd")


class Ledger:
    """Calls, tokens and dollars, shared by the worker threads; enforces the hard budget before each send.
    price: (USD per 1M input tokens, per 1M output tokens); max_usd / max_calls: 0 = no limit. path: a JSON file
    of the totals for the whole run: loaded here, the budget applies to the sums, and it is rewritten atomically
    (tmp + fsync + os.replace) before each send when durable, else at most once a second and by save() at the end;
    it counts reserved (not yet settled) dollars as spent, so a kill -9 never lets a rerun overspend."""
    def __init__(self, price, max_usd=0.0, max_calls=0, path="", durable=True):
        self.price, self.max_usd, self.max_calls, self.path, self.durable = price, max_usd, max_calls, path, durable
        self.lock, self.stopped, self.saved_at = threading.Lock(), None, 0.0
        self.calls = self.retries = self.tokens_in = self.tokens_out = 0
        self.usd = self.reserved = 0.0
        if path and os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    t = json.load(f)
                self.calls, self.retries, self.tokens_in, self.tokens_out = (int(t[k]) for k in TOTALS[:4])
                self.usd = float(t["usd"])
            except (ValueError, KeyError, TypeError) as e:
                raise OracleError(f"budget ledger {path} is unreadable ({type(e).__name__}); fix or delete it")
        self.start = self.totals()

    def totals(self):
        return {"calls": self.calls, "retries": self.retries, "tokens_in": self.tokens_in,
                "tokens_out": self.tokens_out, "usd": round(self.usd + self.reserved, 6)}

    def session(self):
        """Totals spent since this ledger was made (one judge_items call)."""
        now = self.totals()
        return {k: round(now[k] - self.start[k], 6) if k == "usd" else now[k] - self.start[k] for k in TOTALS}

    def save(self, force=True):
        """Write the totals atomically (caller holds the lock, or no worker runs)."""
        if not self.path or not (force or time.time() - self.saved_at >= 1.0):
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.totals(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.saved_at = time.time()

    def cost(self, n_in, n_out):
        return (n_in * self.price[0] + n_out * self.price[1]) / 1e6

    def spend(self, n_in, max_out):
        """Reserve one request (worst case: max_out output tokens) or raise BudgetExceeded."""
        with self.lock:
            est = self.cost(n_in, max_out)
            if self.stopped is None and self.max_calls and self.calls >= self.max_calls:
                self.stopped = f"--max_calls {self.max_calls} reached ({self.calls} calls" + \
                    (f" in the run's ledger {self.path})" if self.path else ")")
            if self.stopped is None and self.max_usd and self.usd + self.reserved + est > self.max_usd:
                self.stopped = f"--max_usd {self.max_usd} reached (${self.usd + self.reserved:.4f} spent)"
            if self.stopped:
                raise BudgetExceeded(self.stopped)
            self.calls += 1
            self.reserved += est
            self.save(force=self.durable)  # durable: on disk before the request leaves
            return est

    def settle(self, est, n_in, n_out):
        with self.lock:
            self.reserved -= est
            self.tokens_in, self.tokens_out = self.tokens_in + n_in, self.tokens_out + n_out
            self.usd += self.cost(n_in, n_out)


OUTAGE = ("connection", "timeout", "server_error")  # failures that say the endpoint is down, not the request bad


class Breaker:
    """Circuit breaker: after `limit` requests in a row failed with an OUTAGE kind (after their retries), with no
    other answer in between, `tripped` holds a one-line reason and `stop` is set: no request is sent any more and
    sleeping retries wake up at once. limit 0 = never trip."""
    def __init__(self, limit, where):
        self.limit, self.where, self.run, self.tripped = limit, where, 0, None
        self.lock, self.stop = threading.Lock(), threading.Event()

    def record(self, value):
        with self.lock:
            self.run = self.run + 1 if value.get("fail") in OUTAGE else 0
            if self.limit and self.run >= self.limit and self.tripped is None:
                self.tripped = (f"judge endpoint {self.where} unavailable: {self.run} requests in a row failed; "
                                f"last: {value['error'][:160]}").replace("\n", " ")
                self.stop.set()

    def check(self):
        if self.tripped:
            raise JudgeUnavailable(self.tripped)


# ----------------------------------------------------------------------------- cache
class Cache:
    """Append-only JSONL {"key", "value"}; one flushed + fsynced line per answer, so a crash loses at most the
    line being written; a torn last line is skipped on load (and the next write starts a fresh line)."""
    def __init__(self, path):
        self.path, self.data, self.lock, self.f = path, {}, threading.Lock(), None
        raw = open(path, "rb").read() if path and os.path.exists(path) else b""
        self.torn = bool(raw) and not raw.endswith(b"\n")
        for line in raw.decode("utf-8", "replace").splitlines():
            try:
                rec = json.loads(line)
                self.data[rec["key"]] = rec["value"]
            except (ValueError, KeyError, TypeError):
                pass  # the torn line

    def put(self, key, value):
        with self.lock:
            self.data[key] = value
            if self.path and self.f is None:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                self.f = open(self.path, "a", encoding="utf-8")
                self.f.write("\n" if self.torn else "")
            if self.f:
                self.f.write(json.dumps({"key": key, "value": value}) + "\n")
                self.f.flush()
                os.fsync(self.f.fileno())

    def close(self):
        if self.f:
            self.f.close()


# ----------------------------------------------------------------------------- HTTP
def endpoint(base_url):
    url = base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
    if not url.startswith(("http://", "https://")):
        raise OracleError(f"--base_url must start with http:// or https://, got {url!r}")
    return url


def connect(base_url, api_key_env, timeout):
    """-> (client, key): the endpoint's pool of keep-alive connections, and the key, read from the environment
    variable NAMED api_key_env (never from a flag or a file)."""
    key = os.environ.get(api_key_env, "")
    if not key:
        raise OracleError(f"missing API key: set ${api_key_env} (any non-empty value for a local server)")
    return pool(endpoint(base_url), timeout, key), key


def run_pool(work, jobs, concurrency):
    """work(job) for every job on `concurrency` threads. A budget stop or a tripped breaker ends the jobs quietly
    (the caller reads ledger.stopped / breaker.tripped); on Ctrl-C or another error nothing more is sent."""
    with ThreadPoolExecutor(max(1, concurrency)) as ex:
        futs = [ex.submit(work, j) for j in jobs]
        try:
            for f in as_completed(futs):
                if not isinstance(f.exception(), (BudgetExceeded, JudgeUnavailable)):
                    f.result()
        finally:
            ex.shutdown(cancel_futures=True)

@lru_cache(maxsize=8)
def pool(url, timeout, key):
    """One `openai` client per (endpoint, key), shared by worker threads and successive runs: its connection pool
    keeps connections alive. Our own retry loop (call) replaces the package's, so max_retries=0."""
    import openai
    return openai.OpenAI(base_url=url.rstrip("/"), api_key=key, timeout=timeout, max_retries=0)


def post(client, body):
    """POST JSON bytes to <base_url>/chat/completions -> (status, headers, bytes). The reply is read as raw bytes:
    building the package's response objects would cost more CPU than the rest of our client (bench_oracle.py).
    Errors become the builtins call() handles: TimeoutError, ConnectionError."""
    import openai
    try:
        return 200, {}, client.post("/chat/completions", cast_to=bytes, content=body,
                                    options={"headers": {"Content-Type": "application/json"}})
    except openai.APIStatusError as e:  # 4xx / 5xx: the caller decides whether to retry
        return e.status_code, e.response.headers, e.response.content
    except openai.APITimeoutError as e:
        raise TimeoutError(str(e)) from None
    except openai.APIConnectionError as e:  # the cause says why: "[Errno 111] Connection refused", ...
        raise ConnectionError(f"{e} {e.__cause__ or ''}".strip()) from None


def call(client, key, body, parse, ledger, breaker, *, n_in, max_out, retries=4, backoff=0.5, seed=""):
    """One chat completion (body: a dict) with retries on 429 / 5xx / timeouts / malformed replies (exponential
    backoff + jitter, or the server's Retry-After); a refused or dropped connection is retried at most twice.
    parse(reply JSON) -> value, raising on a malformed reply. Returns the value, or {"fail": kind, "error": msg}
    after the retries; raises BudgetExceeded / JudgeUnavailable (breaker: a Breaker) instead of sending. n_in,
    max_out: token estimates that the ledger reserves before sending (the server's usage counts replace them)."""
    body, wait = json.dumps(body).encode(), 0.0  # encoded once, resent as is
    for attempt in range(retries + 1):
        if attempt:
            if fail[0] == "connection" and attempt > 2:
                break  # nothing listens there: quick to detect, pointless to hammer
            with ledger.lock:
                ledger.retries += 1
            jitter = random.Random(f"{seed}:{attempt}").random()
            breaker.stop.wait(max(wait, min(30.0, backoff * 2 ** (attempt - 1)) * (0.5 + jitter)))  # a trip wakes it
        breaker.check()
        est = ledger.spend(n_in, max_out)  # may raise BudgetExceeded
        used = (0, 0)  # failed requests are not billed
        try:
            status, headers, raw = post(client, body)
            if status == 200:
                data = json.loads(raw)
                value = parse(data)
                if len(key) >= 8 and key.encode() in raw:  # a server echoing the key must not get it stored
                    value = json.loads(json.dumps(value).replace(key, "***"))
                u = data.get("usage") or {}
                used = (u.get("prompt_tokens") or n_in, u.get("completion_tokens") or max_out)
                breaker.record(value)
                return value
            fail = ("rate_limit" if status == 429 else "server_error" if status >= 500 else f"http_{status}",
                    f"HTTP {status}: {raw[:200].decode('utf-8', 'replace')}")
            ra = headers.get("retry-after", "")  # the server's own advice, in seconds
            wait = min(60.0, float(ra)) if ra.replace(".", "", 1).isdigit() else 0.0
            if status < 500 and status not in (408, 409, 429):
                break  # other 4xx: retrying cannot help
        except TimeoutError as e:
            fail = ("timeout", f"{type(e).__name__}: {e}")
        except OSError as e:
            fail = ("connection", f"{type(e).__name__}: {e}")
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
            fail = ("bad_response", f"{type(e).__name__}: {e}")
        finally:
            ledger.settle(est, *used)
    # never leak the key (keys under 8 chars, like "x" for a local server, are no secret and would mangle text)
    value = {"fail": fail[0], "error": (fail[1].replace(key, "***") if len(key) >= 8 else fail[1])[:300]}
    breaker.record(value)
    return value


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("prompt")
    ap.add_argument("--base_url", default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"))
    ap.add_argument("--model", default="gpt-4o-mini")
    args = ap.parse_args()
    key, ledger = os.environ.get("OPENAI_API_KEY") or sys.exit("error: set $OPENAI_API_KEY"), Ledger(
        PRICES.get(args.model, (0.0, 0.0)))
    out = call(pool(args.base_url, 60.0, key), key, {"model": args.model, "messages": [
        {"role": "user", "content": args.prompt}], "max_tokens": 64}, lambda d: d["choices"][0]["message"]["content"],
        ledger, Breaker(1, args.base_url), n_in=len(args.prompt) // 4 + 10, max_out=64, retries=1)
    print(out, f"| tokens {ledger.tokens_in} in / {ledger.tokens_out} out | ${ledger.usd:.6f}")

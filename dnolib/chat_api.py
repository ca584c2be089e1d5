"""chat_api.py -- a small client for OpenAI-compatible chat-completions endpoints.

Usage:
  OPENAI_API_KEY=x python chat_api.py --base_url http://127.0.0.1:8080/v1 --model tiny "Say hi"

Pooled keep-alive HTTP, failure classes (permanent ones stop the run, transient ones are retried
and feed a circuit breaker), token counts, an append-only JSONL cache. Every request is reserved in
the run's ledger (ledger.py: calls, tokens, dollars, one budget across processes) before it leaves
and settled after. It knows nothing about preferences; oracle.py asks the judges (judging.py)
through it.

Transport: the `openai` package builds the client (base URL, auth and its own headers, proxy and
TLS settings from the environment); each request is one POST of prebuilt bytes and headers on that
client's underlying httpx connection pool: no per-call option parsing, no typed response objects
(bench/bench_oracle.py measures it against a bare http.client POST). Retries are ours
(max_retries=0) so that every failure is counted.
"""
import base64, html, json, math, os, random, re, sys, threading, time, warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote, urlparse

from dnolib import reply
from dnolib.ledger import BudgetExceeded, OracleError


class JudgeUnavailable(OracleError):
    """The breaker tripped (outage) or the endpoint refused for good (401/403/404, quota, context).
    Carries .results, .summary."""
    def __init__(self, msg, results=None, summary=None):
        super().__init__(msg)
        self.results, self.summary = results, summary


# ----------------------------------------------------------------------------- tokens
@lru_cache(maxsize=None)
def get_encoder(spec):
    """tiktoken encoder from a name or a local .tiktoken file (lines 'base64token rank'); None when
    unavailable (named encodings download their BPE file on first use and fail offline): the caller
    decides whether the approximation (len(text) / 4) matters enough to say so."""
    import base64, tiktoken
    try:
        if os.path.isfile(spec):
            with open(spec) as f:
                rows = (ln.split() for ln in f if ln.strip())
                ranks = {base64.b64decode(t): int(r) for t, r in rows}
            return tiktoken.Encoding(os.path.basename(spec), pat_str=r"\s?\w+|\s?[^\w\s]+|\s+",
                                     mergeable_ranks=ranks, special_tokens={})
        return tiktoken.get_encoding(spec)
    except Exception:
        return None


def encoder(model, spec="", warn=False):
    """The tiktoken encoding of a judge model (spec: a name or file; "" = by model). Offline it is
    None (~4 chars/token), said only when it matters (warn: a dollar budget with a known price)."""
    spec = spec or ("o200k_base" if model.startswith(("gpt-4o", "gpt-4.1")) else "cl100k_base")
    enc = get_encoder(spec)
    if enc is None and warn:
        warnings.warn(f"tiktoken encoding {spec!r} unavailable; token counts (and the --max_usd "
                      "budget) are approximate (len(text) / 4)", stacklevel=3)
    return enc


def count_tokens(enc, text):
    return len(enc.encode(text, disallowed_special=())) if enc else math.ceil(len(text) / 4)


def truncate(enc, text, max_tokens):
    """-> (text cut to at most max_tokens tokens, was_truncated)"""
    if enc is None:
        return (text, False) if len(text) <= 4 * max_tokens else (text[:4 * max_tokens], True)
    ids = enc.encode(text, disallowed_special=())
    return (text, False) if len(ids) <= max_tokens else (enc.decode(ids[:max_tokens]), True)


def fit(texts, enc, cap, room, per_request):
    """Texts that share requests of `per_request` texts each -> (texts, indices cut, cap used or
    None). cap > 0: a fixed cap. Else cut only when the largest request would pass `room` tokens,
    each text to an even share of it."""
    if cap <= 0:
        if sum(sorted((count_tokens(enc, t) for t in texts), reverse=True)[:per_request]) <= room:
            return texts, [], None
        cap = max(1, room // per_request)
    cut = [truncate(enc, t, cap) for t in texts]
    return [t for t, _ in cut], [i for i, (_, was) in enumerate(cut) if was], cap


class Breaker:
    """Circuit breaker: after `limit` requests in a row ended in failure (after their retries:
    outages, rate limits, replies that cannot be read), with no answer in between, `tripped` holds
    a one-line reason and `stop` is set: nothing more is sent and sleeping retries wake up. A
    permanent refusal (fatal) trips it at once. limit 0 = trip only on a permanent refusal."""
    def __init__(self, limit, where):
        self.limit, self.where, self.run, self.tripped = limit, where, 0, None
        self.lock, self.stop = threading.Lock(), threading.Event()

    def record(self, value):
        with self.lock:
            self.run = self.run + 1 if "fail" in value else 0
            if self.limit and self.run >= self.limit and self.tripped is None:
                last = value["error"][:160].replace("\n", " ")
                self.tripped = (f"judge endpoint {self.where} unavailable: {self.run} requests "
                                f"in a row failed; last: {last}")
                self.stop.set()

    def fatal(self, why):
        with self.lock:
            if self.tripped is None:
                self.tripped = f"judge endpoint {self.where} refused: {why}".replace("\n", " ")
            self.stop.set()

    def check(self):
        if self.tripped:
            raise JudgeUnavailable(self.tripped)


# ----------------------------------------------------------------------------- cache
class Cache:
    """Append-only JSONL {"key", "value"}; one flushed + fsynced line per answer, so a crash loses
    at most the line being written; a torn last line is skipped on load (and the next write starts
    a fresh line)."""
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
    """The endpoint URL; one-line OracleError for a bad scheme or credentials in it (they would be
    sent as Basic auth instead of the key, and written wherever the URL is)."""
    url = base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
    if not url.startswith(("http://", "https://")):
        raise OracleError(f"--base_url must start with http:// or https://, got {url[:8]!r}...")
    u = urlparse(url)
    if u.username is not None or u.password is not None or u.query or u.fragment or u.params:  # ;k=v
        raise OracleError("--base_url must not hold credentials (user:password@host, ?key=..., "
                          "#...) nor any query or fragment: put the key in the variable named by "
                          "--api_key_env")
    return url


def urls(base_url):
    """--base_url: one endpoint, or several serving the same model (comma-separated) -> [url]."""
    parts = [u.strip() for u in (base_url or "").split(",")]
    if len(parts) > 1 and not all(parts):
        raise OracleError(f"--base_url: an empty endpoint in {base_url!r}")
    return [endpoint(u) for u in parts]


def host(base_url):
    """The judge's name in the cache keys: the first endpoint's host (its peers serve the same
    model, so their answers are one judge's)."""
    return urlparse(urls(base_url)[0]).netloc


@dataclass(frozen=True)
class Client:
    """One endpoint's POST: the openai client's httpx pool, the full URL, prebuilt headers (auth
    included)."""
    http: object                    # the openai client's underlying httpx Client (keep-alive pool)
    url: str                        # <base_url>/chat/completions
    headers: tuple                  # (name, value) pairs sent with every request
    timeout: float                  # seconds for a whole request, a slow drip included
    max_bytes: int                  # a reply past this many bytes is cut (and fails)
    errors: tuple                   # (the transport's timeout exception, its transport error)


def connect(base_url, api_key_env, timeout, max_bytes=2 ** 20):
    """-> (Endpoints, key): each endpoint's pool of keep-alive connections, and the key, read from
    the environment variable NAMED api_key_env (never from a flag or a file)."""
    found = urls(base_url)
    key = os.environ.get(api_key_env, "")
    if not key:
        raise OracleError(f"missing API key: set ${api_key_env} (any non-empty value for a local "
                          "server)")
    if len(key) >= 8 and any(holds_key(u, key) for u in found):
        raise OracleError(f"--base_url holds the key of ${api_key_env}: it would be written "
                          "wherever the URL is")
    return Endpoints([pool(u, timeout, key, max_bytes) for u in found]), key


@lru_cache(maxsize=8)
def pool(url, timeout, key, max_bytes=2 ** 20):
    """One client per (endpoint, key), shared by worker threads and successive runs."""
    import openai
    oc = openai.OpenAI(base_url=url.rstrip("/"), api_key=key, timeout=timeout, max_retries=0)
    keep = ("Accept", "Content-Type", "User-Agent", "OpenAI-Organization", "OpenAI-Project")
    headers = {k: v for k, v in oc.default_headers.items() if k in keep and isinstance(v, str)}
    headers.update(oc.auth_headers)  # no X-Stainless-* telemetry: less for the server to parse
    lib = next(c for c in type(oc._client).__mro__ if not c.__module__.startswith("openai"))
    hx = sys.modules[lib.__module__.split(".")[0]]  # httpx (or its fork) as the package ships it
    return Client(oc._client, str(oc.base_url).rstrip("/") + "/chat/completions",
                  tuple(headers.items()), timeout, max_bytes,
                  (hx.TimeoutException, hx.TransportError))


def post(client, body):
    """POST JSON bytes -> (status, headers, bytes, cut): at most client.max_bytes bytes are read
    (cut: there were more), and the whole request -- connect, send, a reply dripped a byte at a
    time -- ends within client.timeout seconds: it runs on its own thread, which the caller leaves
    at the deadline and which stops at its next chunk. Transport errors become TimeoutError /
    ConnectionError."""
    timeout_error, transport_error = client.errors
    box, done = {}, threading.Event()

    def fetch():
        try:
            with client.http.stream("POST", client.url, content=body, headers=client.headers,
                                    timeout=client.timeout) as r:
                chunks, size = [], 0
                for chunk in r.iter_bytes():  # decompressed: a gzip bomb is bounded too
                    if done.is_set():
                        return  # the caller gave up at the deadline: close the connection
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > client.max_bytes:
                        break
                raw = b"".join(chunks)
                box["out"] = (r.status_code, r.headers, raw[:client.max_bytes],
                              size > client.max_bytes)
        except BaseException as e:  # re-raised on the caller's thread
            box["err"] = e
        finally:
            done.set()
    threading.Thread(target=fetch, daemon=True).start()
    if not done.wait(client.timeout):
        done.set()
        raise TimeoutError(f"no whole reply within --timeout {client.timeout:g} s")
    e = box.get("err")
    if isinstance(e, timeout_error):
        raise TimeoutError(str(e) or type(e).__name__) from None
    if isinstance(e, transport_error):  # "[Errno 111] Connection refused", ...
        raise ConnectionError(f"{type(e).__name__}: {e} {e.__cause__ or ''}".strip()) from None
    if e is not None:
        raise e
    return box["out"]


class Endpoints:
    """The judge's endpoints (--base_url a,b,...): requests go round the live ones. One that stops
    answering (DEAD_AFTER refused connections or timeouts in a row) is said by name once and
    skipped while another is live; the last live one is never skipped, so an outage of all of them
    still reaches the run's breaker. One ledger and one breaker for all."""
    DEAD_AFTER = 2

    def __init__(self, clients):
        self.clients, self.lock, self.rounds = list(clients), threading.Lock(), 0
        self.misses, self.dead = [0] * len(self.clients), set()
        self.refusals = Refusals("", "")  # judge_items gives the run's (the file, the judge)
        self.gate, self.open = threading.Lock(), False  # see turn()

    @contextmanager
    def turn(self):
        """One request at a time until a reply shows the parameters accepted (opened()): a
        refusal is then met by one request, learned, and never sent by the others in flight."""
        if self.open:
            yield
            return
        with self.gate:
            yield

    def opened(self):
        self.open = True

    def pick(self):
        """-> (index, Client) of the next live endpoint."""
        with self.lock:
            live = [i for i in range(len(self.clients)) if i not in self.dead]
            self.rounds += 1
            i = live[self.rounds % len(live)]
            return i, self.clients[i]

    def answered(self, i):
        with self.lock:
            self.misses[i] = 0

    def missed(self, i, why, at_once=False):
        with self.lock:
            self.misses[i] += self.DEAD_AFTER if at_once else 1
            live = len(self.clients) - len(self.dead)
            if self.misses[i] >= self.DEAD_AFTER and i not in self.dead and live > 1:
                self.dead.add(i)
                print(f"judge: endpoint {self.clients[i].url} skipped ({why[:120]}); "
                      f"{live - 1} of {len(self.clients)} still answer", file=sys.stderr)


READY = set()  # endpoints that answered wait_ready in this process


def wait_ready(endpoints, seconds):
    """Before the first request: poll GET <base_url>/models of every endpoint until it answers (a
    status below 500: llama.cpp says 503 while it loads) or `seconds` pass; one line on stderr
    says what it waits for. Endpoints still silent then are skipped when another answered, else
    JudgeUnavailable (one line). Once per endpoint and process."""
    t0, said = time.monotonic(), False
    todo = [i for i, c in enumerate(endpoints.clients) if c.url not in READY]
    models = lambda c: c.url.rsplit("/chat/completions", 1)[0] + "/models"
    while todo:
        for i in list(todo):
            c = endpoints.clients[i]
            try:
                r = c.http.get(models(c), headers=dict(c.headers), timeout=min(5.0, c.timeout))
                if r.status_code < 500:
                    READY.add(c.url)
                    todo.remove(i)
            except c.errors:
                pass  # not listening yet
        waited = time.monotonic() - t0
        if todo and waited > seconds:
            if len(todo) == len(endpoints.clients):
                raise JudgeUnavailable(f"judge endpoint {models(endpoints.clients[todo[0]])} did "
                                       f"not answer within --judge_wait {seconds:g} s")
            for i in todo:
                endpoints.missed(i, f"no answer within --judge_wait {seconds:g} s", at_once=True)
            return
        if todo and not said:
            said = True
            what = ", ".join(models(endpoints.clients[i]) for i in todo)
            print(f"judge: waiting up to {seconds:g} s for {what} to answer", file=sys.stderr)
        if todo:
            time.sleep(min(1.0, max(0.0, seconds - waited) + 0.01))


# ----------------------------------------------------------------------------- refused parameters
RENAMED = {"max_tokens": "max_completion_tokens"}  # what reasoning models take instead
OPTIONAL = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")  # default ok


def refused(status, text, body):
    """The parameter a 400 says the model does not support (OpenAI: error.param with code
    unsupported_parameter / unsupported_value; other servers: the quoted name in the message), if
    the body sends it and it can be renamed or left out; else None."""
    low = text.lower()
    if status != 400 or not any(w in low for w in ("unsupported", "not supported",
                                                   "does not support", "unrecognized")):
        return None
    try:
        names = [json.loads(text)["error"]["param"]]
    except (ValueError, KeyError, TypeError):
        names = []
    names += [p for p in (*RENAMED, *OPTIONAL) if re.search(rf"['\"`]{p}['\"`]", text)]
    return next((p for p in names if p in body and (p in RENAMED or p in OPTIONAL)), None)


class Refusals:
    """The parameters this judge refused, learned from its 400 once and recorded in the run's file
    (path: {judge: {param: what is sent instead, or null: left out}}), applied to every request
    after: max_tokens sent as max_completion_tokens, a refused sampling parameter left out (the
    server's default). The cache keys name them (oracle.plan_item)."""
    def __init__(self, path, judge):
        self.path, self.judge, self.lock = path, judge, threading.Lock()
        self.changes = dict(self.read().get(judge, {}))

    def read(self):
        if not (self.path and os.path.exists(self.path)):
            return {}
        try:
            got = json.load(open(self.path, encoding="utf-8"))
            assert isinstance(got, dict) and all(isinstance(v, dict) for v in got.values())
            return got
        except (ValueError, AssertionError):
            raise OracleError(f"{self.path}: not the record of refused judge parameters; "
                              "delete it to learn them again") from None

    def apply(self, body):
        out = dict(body)
        for p, instead in self.changes.items():
            if p in out:
                v = out.pop(p)
                if instead:
                    out[instead] = v
        return out

    def learn(self, param):
        with self.lock:
            if param in self.changes:
                return  # another request learned it first
            self.changes[param] = RENAMED.get(param)
            if self.path:
                every = {**self.read(), self.judge: self.changes}
                with open(self.path + ".tmp", "w", encoding="utf-8") as f:
                    json.dump(every, f, indent=1)
                os.replace(self.path + ".tmp", self.path)
            instead = f"sent as {RENAMED[param]!r}" if param in RENAMED else "left out"
            print(f"judge: {self.judge} refused {param!r}: {instead} from now on"
                  + (f" (recorded in {self.path})" if self.path else ""), file=sys.stderr)


def run_pool(work, jobs, concurrency):
    """work(job) for every job on `concurrency` threads. A budget stop or a tripped breaker ends
    the jobs quietly (the caller reads ledger.stopped / breaker.tripped); on Ctrl-C or another
    error nothing more is sent."""
    with ThreadPoolExecutor(max(1, concurrency)) as ex:
        futs = [ex.submit(work, j) for j in jobs]
        try:
            for f in as_completed(futs):
                if not isinstance(f.exception(), (BudgetExceeded, JudgeUnavailable)):
                    f.result()
        finally:
            ex.shutdown(cancel_futures=True)


# ----------------------------------------------------------------------------- one request
UNESCAPE = re.compile(r"\\+(?:u([0-9a-fA-F]{4})|x([0-9a-fA-F]{2}))")  # literal \uXXXX / \xXX text


def views(text):
    """text as a careless server may have encoded it: as is, HTML entities, %-escapes, literal
    \\u / \\x escapes (and these chained), without blanks (for base64 split over lines)."""
    unu = lambda t: UNESCAPE.sub(lambda m: chr(int(m.group(1) or m.group(2), 16)), t)
    once = html.unescape(unquote(text))
    return {text, html.unescape(text), unquote(text), unu(text), unu(once),
            unu(html.unescape(unquote(once))), re.sub(r"\s", "", text)}  # twice: &amp;#115;


@lru_cache(maxsize=8)
def encoded_forms(key):
    """Substrings that only a text holding the key has: its hex, and its base64 (standard and
    URL-safe) at the three byte alignments, less the edge characters that its neighbours shape."""
    kb, forms = key.encode(), {key.encode().hex(), key.encode().hex().upper()}
    for o in range(3):
        e = base64.b64encode(b"\0" * o + kb).decode()
        core = e[4 if o else 0:4 * ((o + len(kb)) // 3)]
        forms |= {core, core.replace("+", "-").replace("/", "_")} if len(core) >= 8 else set()
    return forms


def holds_key(text, key):
    """Whether text holds the key, literally or in a common encoding (see views, encoded_forms)."""
    bare = re.sub(r"\s", "", text)  # base64 wrapped over lines
    return any(key in v for v in views(text)) or any(f in bare for f in encoded_forms(key))


def scrub(value, key):
    """value with the key masked as *** in every string. A key still there in another encoding
    (HTML entities, base64, hex, %- or \\u-escapes) withholds the whole value: a string becomes
    WITHHELD, a reply a failure that stores none of its text. Keys under 8 characters (like "x"
    for a local server) are no secret and would mangle text."""
    if len(key) < 8:
        return value
    found = []

    def walk(v):
        if isinstance(v, str):
            v = v.replace(key, "***")
            found.append(holds_key(v, key))
            return v
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, dict):
            return {walk(k): walk(x) for k, x in v.items()}
        return v
    out = walk(value)
    if not any(found):
        return out
    if isinstance(value, str):
        return WITHHELD
    return {"fail": "key_echo", "error": f"the reply held the API key, encoded: {WITHHELD}",
            "raw": WITHHELD}


WITHHELD = "(withheld: it held the API key in an encoded form)"


def error_text(raw, key):
    """An error body as readable text, \\u escapes decoded before the key is masked."""
    text = raw.decode("utf-8", "replace")
    try:
        text = json.dumps(json.loads(text), ensure_ascii=False)
    except ValueError:
        pass
    return scrub(text, key)


def permanent(status, text):
    """Why retrying can never help (a one-line cause), or None."""
    low = text.lower()
    if status == 401:
        return "HTTP 401 authentication failed: check the key in the variable --api_key_env names"
    if status == 403:
        return "HTTP 403 permission denied for this key or model"
    if status == 404:
        return "HTTP 404 not found: check --base_url and --judge_model"
    if status == 429 and "insufficient_quota" in low:
        return "HTTP 429 insufficient_quota: the account's quota is used up"
    if status in (400, 413) and ("context_length" in low or "context length" in low
                                 or "too long" in low or "too many tokens" in low):
        return f"HTTP {status} the request does not fit the model's context: lower --judge_context"
    return None


def call(endpoints, key, body, parse, ledger, breaker, *, n_in, max_out, retries=4, backoff=0.5,
         seed="", keep=lambda value: None):
    """One chat completion (body: a dict) from the next live endpoint. parse(reply JSON) -> value:
    raises on a reply that is not a completion (retried) or returns {"fail", "error", "raw"} for
    one that arrived but cannot be read (kept, not retried). Transient failures (429, 5xx, 408,
    timeouts, connections) are retried with exponential backoff + jitter or the server's
    Retry-After; a refused connection at most twice. Permanent ones (401/403/404, quota, context)
    trip the breaker at once. A 400 refusing a parameter (Refusals) is learned and the request
    sent again at once, changed: one extra request per refusal. Every request is reserved in the
    ledger before it leaves (may raise BudgetExceeded) and settled after: a 200 from its `usage`
    (the worst case without one), a non-200 at 0. keep(value) stores the final value before its
    request is settled, so a kill in between leaves it counted as unsettled, never stored and
    unbilled. Returns the value, or {"fail", "error"} after the retries."""
    refusals, data, known, wait, fail = endpoints.refusals, None, None, 0.0, None
    text = None  # the last 200's text: kept with the failure when no attempt could be read
    attempt, learned = 0, 0
    while attempt <= retries:
        if attempt:
            if fail[0] == "connection" and attempt > 2:
                break  # nothing listens there: quick to detect, pointless to hammer
            ledger.retry()
            jitter = random.Random(f"{seed}:{attempt}").random()
            sleep = max(wait, min(30.0, backoff * 2 ** (attempt - 1)) * (0.5 + jitter))
            breaker.stop.wait(sleep)  # a trip wakes it
        attempt += 1
        breaker.check()
        i, client = endpoints.pick()
        ticket, billed, param = ledger.spend(n_in, max_out), (0, 0), None
        try:
            with endpoints.turn():
                if known != len(refusals.changes):  # encoded once, and again after a refusal
                    known, sent = len(refusals.changes), refusals.apply(body)
                    data = json.dumps(sent).encode()
                status, headers, raw, cut = post(client, data)
                text = error_text(raw, key) if status != 200 else None
                param = refused(status, text, sent) if text else None
                if param and learned < len(RENAMED) + len(OPTIONAL):
                    refusals.learn(param)  # inside the turn: no other request meets it
                else:
                    endpoints.opened()
            endpoints.answered(i)
            if param and learned < len(RENAMED) + len(OPTIONAL):
                learned, attempt = learned + 1, attempt - 1
                ledger.retry()
                continue  # the same request, changed: not a failure, no backoff
            if status == 200:
                billed = (n_in, max_out)  # it arrived, so it is billed: worst case until usage
                text = raw.decode("utf-8", "replace")
                if cut:  # not retried: the same request would get the same flood
                    value = {"fail": "too_large", "raw": text, "error": f"reply cut at "
                             f"{len(raw)} bytes (--max_reply_bytes): more was sent"}
                else:
                    doc = reply.document(raw)  # not JSON: Unreadable, retried below
                    billed, why = reply.billable(doc, n_in, max_out)
                    if why:
                        ledger.distrusted(why)
                    value = parse(doc)
                value = scrub(value, key)
                keep(value)
                breaker.record(value)
                return value
            fail = ("rate_limit" if status == 429 else "server_error" if status >= 500
                    else f"http_{status}", f"HTTP {status}: {text[:200]}")
            why = permanent(status, text)
            if why:
                breaker.fatal(f"{why} ({text[:120]})")
                raise JudgeUnavailable(breaker.tripped)
            ra = headers.get("retry-after", "")  # the server's own advice, in seconds
            wait = min(60.0, float(ra)) if ra.replace(".", "", 1).isdigit() else 0.0
            if status < 500 and status not in (408, 409, 429):
                break  # another 4xx: this request is wrong, retrying cannot help
        except JudgeUnavailable:
            raise  # a permanent refusal (an OracleError, so a ValueError: not a bad response)
        except TimeoutError as e:
            fail = ("timeout", f"{type(e).__name__}: {e}")
            endpoints.missed(i, fail[1])
        except OSError as e:
            fail = ("connection", f"{type(e).__name__}: {e}")
            endpoints.missed(i, fail[1])
        except (AttributeError, IndexError, KeyError, TypeError, ValueError, ArithmeticError,
                RecursionError) as e:  # a 200 that is not a completion we can read
            fail = ("bad_response", f"{type(e).__name__}: {str(e)[:200]}")
        finally:
            ledger.settle(ticket, *billed)
    value = {"fail": fail[0], "error": scrub(fail[1], key)[:300]}
    if fail[0] == "bad_response" and text is not None:
        value = scrub({**value, "raw": text}, key)  # billed: cached, asked again on request only
    keep(value)
    breaker.record(value)
    return value


if __name__ == "__main__":
    import argparse

    from dnolib.ledger import PRICES, Ledger
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("prompt")
    ap.add_argument("--base_url", default="")
    ap.add_argument("--model", default="gpt-4o-mini")
    args = ap.parse_args()
    try:
        client, key = connect(args.base_url, "OPENAI_API_KEY", 60.0)
    except OracleError as e:
        sys.exit(f"error: {e}")
    ledger = Ledger(PRICES.get(args.model, (0.0, 0.0)))
    messages = [{"role": "user", "content": args.prompt}]
    body = {"model": args.model, "messages": messages, "max_tokens": 64}
    out = call(client, key, body, lambda d: d["choices"][0]["message"]["content"], ledger,
               Breaker(1, args.base_url), n_in=len(args.prompt) // 4 + 10, max_out=64, retries=1)
    t = ledger.totals()
    print(out, f"| tokens {t['tokens_in']} in / {t['tokens_out']} out | ${t['usd']:.6f}")

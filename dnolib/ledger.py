"""ledger.py: what the run's judge requests cost -- calls, tokens and dollars in one JSON file that
every process shares, with a hard budget checked before each request leaves.

Usage:
    python ledger.py                              # demo: two sessions share one file and one budget
    python -m pytest -q tests/test_oracle.py -k ledger tests/test_dnolib/judging.py -k "ledger or kill"

    from dnolib.ledger import PRICES, Ledger, BudgetExceeded
    led = Ledger(PRICES["gpt-4o-mini"], max_usd=5.0, path="run/judge_ledger.json")
    ticket = led.spend(n_in, max_out)             # reserve the worst case, or BudgetExceeded
    led.settle(ticket, usage_in, usage_out)       # the reply's real bill replaces the reservation
    led.totals(), led.session()                   # the run's totals (all processes), this one's

A file lock (fcntl.flock on path + ".lock") makes every change one transaction: read, change,
write atomically. A request's worst-case cost is reserved (and fsynced) before it leaves and settled
from the reply's `usage` after, whatever the parse outcome (chat_api.call: a 200 that cannot be
read is billed). A request in flight when its process is killed (kill -9) stays reserved at its
worst case: the ledger counts it as spent and reports it as "unsettled"; the rerun may send it
again (at most --concurrency such requests per kill). The local and Python judges (judging.py) spend
through it at price 0, so --max_calls bounds them too.
"""
import fcntl
import json
import math
import os
import sys
import tempfile
import threading
import time
import uuid
import warnings

# USD per 1M tokens (input, output); oracle.py's --prices '{"model": [in, out]}' extends it
PRICES = {"gpt-4-turbo": (10.0, 30.0), "gpt-4o": (2.5, 10.0), "gpt-4o-mini": (0.15, 0.6),
          "gpt-4.1": (2.0, 8.0), "gpt-4.1-mini": (0.4, 1.6)}


class BudgetExceeded(RuntimeError):
    """--max_usd / --max_calls hit; everything judged so far is cached. Carries .results,
    .summary."""
    def __init__(self, msg, results=None, summary=None):
        super().__init__(msg)
        self.results, self.summary = results, summary


class OracleError(ValueError):
    """A user/setup mistake with a one-line message (CLIs print it and exit)."""


COUNTS = ("calls", "retries", "tokens_in", "tokens_out")


def check_price(price, what="price"):
    """(USD per 1M input tokens, per 1M output tokens) -> the pair; a one-line OracleError unless
    both are finite numbers >= 0 (a negative price would credit the budget)."""
    try:
        p = tuple(price)
        ok = len(p) == 2 and all(type(x) in (int, float) and math.isfinite(x) and x >= 0
                                 for x in p)
    except TypeError:
        ok = False
    if not ok:
        raise OracleError(f"{what} must be [usd_in, usd_out] per 1M tokens, both >= 0; got "
                          f"{str(price)[:60]}")
    return p


def parse_prices(text):
    """--prices -> {model: (usd_in, usd_out) per 1M tokens}: "model=in,out[;model2=in,out]", a
    JSON object {"model": [in, out]} or the path of a file holding one; a one-line OracleError."""
    text = (text or "").strip()
    try:
        if text and not text.startswith("{") and os.path.isfile(text):
            with open(text, encoding="utf-8") as f:
                text = f.read().strip()
        if text.startswith("{"):
            obj = json.loads(text)
        else:
            rows = [r.partition("=") for r in text.split(";") if r.strip()]
            obj = {m.strip(): [float(x) for x in v.split(",")] for m, _, v in rows}
        assert isinstance(obj, dict)
    except (ValueError, AssertionError, OSError):
        raise OracleError(f"--prices must be model=usd_in,usd_out (per 1M tokens), a JSON object "
                          f"{{\"model\": [in, out]}} or a JSON file; got {text[:60]!r}") from None
    return {m: check_price(p, f"--prices {m!r}") for m, p in obj.items()}


def whole(x):
    return type(x) is int and x >= 0


def amount(x):
    return type(x) in (int, float) and math.isfinite(x) and x >= 0


class Ledger:
    """Calls, tokens and dollars, shared by threads and (with a path) by processes; enforces the
    hard budget before each send. price: (USD per 1M input tokens, per 1M output tokens); max_usd /
    max_calls: 0 = none. path: the run's JSON file {calls, retries, tokens_in, tokens_out, usd,
    reserved: {ticket: usd}}; every change is one transaction under an exclusive flock of path +
    ".lock" (read, change, write atomically; fsynced before a request leaves when durable). Budgets
    apply to the file's totals, reserved included."""
    def __init__(self, price, max_usd=0.0, max_calls=0, path="", durable=True, lock_wait=120.0):
        self.price, self.max_usd, self.max_calls = check_price(price), max_usd, max_calls
        self.path = path
        self.durable, self.lock, self.stopped = durable, threading.Lock(), None
        self.lock_wait, self.said_wait = lock_wait, False  # seconds to wait for another process
        self.t = {**dict.fromkeys(COUNTS, 0), "usd": 0.0, "reserved": {}}
        self.mine = {**dict.fromkeys(COUNTS, 0), "usd": 0.0, "bad_usage": 0}  # this ledger's share
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.transact(lambda t: None)  # a bad file is refused before any request

    def read(self):
        if not os.path.exists(self.path):
            return {**dict.fromkeys(COUNTS, 0), "usd": 0.0, "reserved": {}}
        try:
            with open(self.path, encoding="utf-8") as f:
                t = json.load(f)
            out = {**{k: t[k] for k in COUNTS}, "usd": t["usd"]}
            out["reserved"] = {str(k): v for k, v in (t.get("reserved") or {}).items()}
            # negative, NaN or infinite values (a server's lie written by an older version)
            if not (all(whole(out[k]) for k in COUNTS) and amount(out["usd"])
                    and all(amount(v) for v in out["reserved"].values())):
                raise ValueError("a count or amount that is not finite and >= 0")
            return out
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise OracleError(f"budget ledger {self.path} is unreadable ({type(e).__name__}: "
                              f"{str(e)[:60]}); fix or delete it") from None

    def write(self, sync):
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.t, f, allow_nan=False)  # never a value read() would refuse
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def transact(self, change, sync=False):
        """change(totals) under the thread lock and, with a path, the file lock: read, change,
        write."""
        with self.lock:
            if not self.path:
                return change(self.t)
            with open(self.path + ".lock", "a") as lock:
                self.acquire(lock)  # released when the file closes
                self.t = self.read()
                out = change(self.t)
                self.write(sync)
                return out

    def acquire(self, lock):
        """The exclusive file lock; another process holding it is said once (after 2 s) and,
        after lock_wait seconds, is a one-line OracleError rather than a silent freeze."""
        t0, nap = time.monotonic(), 0.001
        while True:
            try:
                return fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                waited = time.monotonic() - t0
            if waited > self.lock_wait:
                raise OracleError(f"the ledger's lock {self.path}.lock has been held by another "
                                  f"process for {waited:.0f} s; is a judge stuck? (stop it, then "
                                  "rerun)")
            if waited > 2 and not self.said_wait:
                self.said_wait = True
                print(f"ledger: waiting for {self.path}.lock, held by another process (giving up "
                      f"after {self.lock_wait:g} s)", file=sys.stderr)
            time.sleep(nap)
            nap = min(0.05, nap * 2)

    def totals(self):
        """The run's totals (the file's, re-read): reserved dollars count as spent."""
        if self.path:
            self.transact(lambda t: None)
        t = self.t
        usd = t["usd"] + sum(t["reserved"].values())  # reserved = spent until settled
        return {**{k: t[k] for k in COUNTS}, "usd": round(usd, 6), "unsettled": len(t["reserved"])}

    def session(self):
        """What this ledger itself spent (one judge_items call), settled and reserved."""
        return {**self.mine, "usd": round(self.mine["usd"], 6)}

    def cost(self, n_in, n_out):
        return (n_in * self.price[0] + n_out * self.price[1]) / 1e6

    def spend(self, n_in, max_out):
        """Reserve one request at its worst case (max_out output tokens) -> its ticket, or
        BudgetExceeded."""
        est, ticket = self.cost(n_in, max_out), f"{os.getpid()}-{uuid.uuid4().hex[:12]}"

        def reserve(t):
            spent = t["usd"] + sum(t["reserved"].values())
            if self.stopped is None and self.max_calls and t["calls"] >= self.max_calls:
                where = f" in the run's ledger {self.path}" if self.path else ""
                self.stopped = f"--max_calls {self.max_calls} reached ({t['calls']} calls{where})"
            if self.stopped is None and self.max_usd and spent + est > self.max_usd:
                self.stopped = f"--max_usd {self.max_usd} reached (${spent:.4f} spent)"
            if self.stopped:
                raise BudgetExceeded(self.stopped)
            t["calls"] += 1
            t["reserved"][ticket] = est
        self.transact(reserve, sync=self.durable)  # durable: on disk before the request leaves
        self.mine["calls"] += 1
        return ticket

    def settle(self, ticket, n_in, n_out):
        """The request's real bill (0, 0 when nothing was billed) replaces its reservation. The
        counts are ours or checked (reply.billable): anything else is a bug, refused."""
        if not (whole(n_in) and whole(n_out)):
            raise ValueError(f"settle wants token counts >= 0, got {n_in!r}, {n_out!r}")
        usd = self.cost(n_in, n_out)

        def pay(t):
            t["reserved"].pop(ticket, None)
            t["tokens_in"] += n_in
            t["tokens_out"] += n_out
            t["usd"] += usd
        self.transact(pay)
        for k, v in (("tokens_in", n_in), ("tokens_out", n_out), ("usd", usd)):
            self.mine[k] += v

    def distrusted(self, why):
        """A reply's usage was not believable: billed at the worst case, counted, said once."""
        with self.lock:
            self.mine["bad_usage"] += 1
        warnings.warn(f"judge endpoint: {why}; billed at the reserved worst case", stacklevel=2)

    def retry(self):
        self.transact(lambda t: t.update(retries=t["retries"] + 1))
        self.mine["retries"] += 1


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "judge_ledger.json")
        price = PRICES["gpt-4o-mini"]
        # two sessions (as two processes would) on one file, one $0.001 budget
        a = Ledger(price, max_usd=0.001, path=path)
        b = Ledger(price, max_usd=0.001, path=path)
        sent = 0
        try:
            while True:
                led = (a, b)[sent % 2]
                ticket = led.spend(2000, 500)      # worst case: 2000 in, 500 out ($0.0006)
                led.settle(ticket, 2000, 120)      # billed: 120 out ($0.000372)
                sent += 1
        except BudgetExceeded as e:
            print(f"stopped after {sent} requests: {e}")
        print("run totals:", a.totals())
        print("session a:", a.session(), "| session b:", b.session())
        rerun = Ledger(price, max_usd=0.01, path=path)   # a rerun with a larger budget
        rerun.spend(2000, 500)                     # reserved, never settled: killed in flight
        print("after a request lost to kill -9:", Ledger(price, path=path).totals())

"""Throughput of oracle.py's client against the raw capacity of the same local server, in one run.

    python bench/bench_oracle.py              # starts a tiny llama-cpp-python server on 127.0.0.1
    python bench/bench_oracle.py --items 32 --concurrency 4 --repeats 3

raw  = the same chat-completion payloads (pairwise verdicts, both orders) POSTed by bare threads
       over keep-alive http.client connections, no parsing beyond json.loads;
ours = oracle.judge_items (chat_api.py client and retries, ledger.py, token counts, result assembly),
       cache off.
After a warm-up, `repeats` raw/ours pairs run back to back (alternating which goes first);
reported: the median and quartiles of the per-pair ratios ours/raw, the ratio of medians, the
client and server CPU per request of each, and the machine's load average (on a busy 2-core box
single runs vary by 2x). Because the wall-clock ratios swing with other people's load, the CPU
figures also give the load-independent ratio a CPU-bound machine would show (target >= 0.95):
cpu_bound_ratio = (server + client CPU per request, raw) / (the same, ours). Then the client CPU
of the transport alone, three ways: the `openai` package's post(), its httpx client with prebuilt
headers (chat_api.post, what the oracle uses), a bare http.client connection.
"""
import argparse, http.client, json, os, statistics, sys, tempfile, threading, time
from urllib.parse import urlparse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(HERE, "..", "tests")]


def cpu_seconds(pid):
    """user + system CPU seconds of a process, all threads (Linux /proc); None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            v = f.read().rsplit(")", 1)[1].split()  # after the command name; utime, stime: 14, 15
        return (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def raw_run(base_url, payloads, concurrency):
    """Bare capacity: `concurrency` threads, each with a keep-alive connection, pulling jobs."""
    u, it, lock = urlparse(base_url), iter(range(len(payloads))), threading.Lock()

    def worker():
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        while True:
            with lock:
                k = next(it, None)
            if k is None:
                return conn.close()
            conn.request("POST", u.path + "/chat/completions", body=payloads[k],
                         headers={"Content-Type": "application/json", "Authorization": "Bearer x"})
            r = conn.getresponse()
            assert r.status == 200, r.status
            json.loads(r.read())
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return time.perf_counter() - t0


def transport_cpu(base_url, payloads, key="x"):
    """Client CPU ms per request of three ways to POST the same payloads one after another: the
    `openai` package's own post() (option parsing per call), its httpx client with prebuilt headers
    (chat_api.post, what the oracle uses), and a bare keep-alive http.client connection."""
    import openai
    from dnolib import chat_api
    u = urlparse(base_url)
    hdr = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    oc = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)
    ours = chat_api.pool(base_url, 60.0, key)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)

    def bare(body):
        conn.request("POST", u.path + "/chat/completions", body=body, headers=hdr)
        return conn.getresponse().read()

    def package(body):
        opts = {"headers": {"Content-Type": "application/json"}}
        return oc.post("/chat/completions", cast_to=bytes, content=body, options=opts)
    ways = {"openai_post": package, "openai_httpx_prebuilt": lambda b: chat_api.post(ours, b),
            "http_client": bare}
    out = {}
    for name, send in ways.items():
        send(payloads[0])  # warm: a connection is open
        c0 = time.process_time()
        for b in payloads:
            send(b)
        out[name] = round(1e3 * (time.process_time() - c0) / len(payloads), 3)
    conn.close()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--candidates", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=9, help="raw/ours pairs")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    ap.add_argument("--base_url", default="", help="use a running server instead of starting one")
    ap.add_argument("--model", default="tiny")
    args = ap.parse_args()
    import oracle
    os.environ.setdefault("BENCH_KEY", "x")
    proc = None
    if not args.base_url:
        from llama_server import start_server
        args.base_url, proc = start_server(tempfile.mkdtemp(), threads=args.threads)
    try:
        cfg = oracle.Config(judge="pairwise", base_url=args.base_url, judge_model=args.model,
                            api_key_env="BENCH_KEY", cache="", concurrency=args.concurrency,
                            judge_params='{"repeat_penalty": 1.0}')
        colours = ["red", "blue", "green", "amber", "teal"][:args.candidates]
        items = [{"id": str(k), "prompt": f"Question {k}: name a colour you like and why.",
                  "candidates": [f"{w} because it is {w}." * (1 + (k + j) % 3)
                                 for j, w in enumerate(colours)]}
                 for k in range(args.items)]
        enc = oracle.encoder(cfg.judge_model, cfg.encoding)
        plans = [oracle.plan_item(it, cfg, None, enc, cfg.judge_model) for it in items]
        units = [u for units, _, _ in plans for u in units]
        sampling = {"max_tokens": 1, "temperature": 0.0, "logprobs": True,
                    "top_logprobs": cfg.top_logprobs, "repeat_penalty": 1.0}
        bodies = [{"model": cfg.judge_model, "messages": u["messages"], **sampling} for u in units]
        payloads = [json.dumps(b).encode() for b in bodies]
        raw_run(args.base_url, payloads[:8], args.concurrency)  # warm-up
        oracle.judge_items(items[:2], cfg, progress=False)
        rps, cpu, srv = {"raw": [], "ours": []}, {"raw": [], "ours": []}, {"raw": [], "ours": []}
        server_pid = proc.pid if proc is not None else None

        def timed(f):  # -> (requests/s, client CPU ms/request (all threads), server's)
            s0, c0, t0 = cpu_seconds(server_pid), time.process_time(), time.perf_counter()
            f()
            t, c, s1 = time.perf_counter() - t0, time.process_time() - c0, cpu_seconds(server_pid)
            n = len(payloads)
            return n / t, 1e3 * c / n, None if None in (s0, s1) else 1e3 * (s1 - s0) / n

        def ours_run():
            res, summ = oracle.judge_items(items, cfg, progress=False)
            assert summ["calls"] == len(payloads) and all(r["ok"] for r in res), summ

        def raw():
            return raw_run(args.base_url, payloads, args.concurrency)
        for k in range(args.repeats):  # alternate which goes first: drift in the load cancels
            for name in (("raw", "ours") if k % 2 == 0 else ("ours", "raw")):
                r, c, sv = timed(ours_run if name == "ours" else raw)
                rps[name].append(r), cpu[name].append(c), srv[name].append(sv)
        paired = sorted(b / a for a, b in zip(rps["raw"], rps["ours"]))
        transports = transport_cpu(args.base_url, payloads[:32])
        med = {k: round(statistics.median(v), 2) for k, v in cpu.items()}
        med_srv = {k: round(statistics.median(v), 2) if None not in v else None
                   for k, v in srv.items()}
        bound = None
        if None not in med_srv.values():
            bound = round((med["raw"] + med_srv["raw"]) / (med["ours"] + med_srv["ours"]), 3)
        print(json.dumps({
            "requests_per_run": len(payloads), "concurrency": args.concurrency,
            "pairs": args.repeats, "raw_req_per_s": [round(x, 1) for x in rps["raw"]],
            "ours_req_per_s": [round(x, 1) for x in rps["ours"]],
            "median_paired_ratio": round(statistics.median(paired), 3),
            "paired_ratio_quartiles": [round(x, 3) for x in statistics.quantiles(paired, n=4)],
            "ratio_of_medians": round(statistics.median(rps["ours"])
                                      / statistics.median(rps["raw"]), 3),
            "client_cpu_ms_per_req": med, "server_cpu_ms_per_req": med_srv,
            "cpu_bound_ratio": bound,
            "transport_cpu_ms_per_req": transports, "target": 0.95,
            "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}))
    finally:
        if proc is not None:
            from llama_server import stop_server
            stop_server(proc)


if __name__ == "__main__":
    main()

"""Judges that exist today (issue 27, item 1): a reasoning model that refuses parameters, learned
from its 400 once; --judge_params sent and keyed; several endpoints, one of them dead. Fake
OpenAI-compatible servers on 127.0.0.1 whose every byte the test writes; CPU, offline.

    python -m pytest -q tests/test_judge_servers.py
"""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from oracle import judge_items
from test_train import free_port
from test_wire import ITEM, OWN, Wire, cfg, completion, continuation, key  # noqa: F401 (fixture)


class Server:
    """A chat-completions server: answer(request dict) -> (status, bytes); every request kept."""
    def __init__(self, answer):
        self.answer, self.seen, self.lock = answer, [], threading.Lock()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with srv.lock:
                    srv.seen.append(req)
                status, body = srv.answer(req)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def error(message, param, code):
    return json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": param, "code": code}}).encode()


def reasoning_model(req):
    """What a reasoning model answers (OpenAI's wording): max_tokens refused, and any temperature
    but the default."""
    if "max_tokens" in req:
        return 400, error("Unsupported parameter: 'max_tokens' is not supported with this model. "
                          "Use 'max_completion_tokens' instead.", "max_tokens",
                          "unsupported_parameter")
    if req.get("temperature", 1) != 1:
        return 400, error("Unsupported value: 'temperature' does not support 0.0 with this "
                          "model. Only the default (1) value is supported.", "temperature",
                          "unsupported_value")
    return 200, completion(continuation(OWN))


def items(n, tag="q"):
    return [{**ITEM, "id": f"{tag}{k}", "prompt": f"{ITEM['prompt']} #{tag}{k}"} for k in range(n)]


def test_a_refused_parameter_is_learned_once_recorded_and_keyed(tmp_path, key):
    record = tmp_path / "judge_refused.json"
    with Server(reasoning_model) as srv:
        c = cfg(tmp_path, srv.url, judge_model="gpt-5-mini", concurrency=8, refused=str(record))
        res, s = judge_items(items(6), c, progress=False)
        # was: 6 requests, each an http_400 failure
        assert all(r["ok"] for r in res) and [r["scores"] for r in res] == [[float(x) for x in OWN]] * 6
        assert len(srv.seen) == 6 + 2  # one extra request per distinct refusal, 8 in flight
        answered = srv.seen[2:]
        assert all("max_completion_tokens" in q and "max_tokens" not in q
                   and "temperature" not in q for q in answered)
        got = json.loads(record.read_text())  # recorded in the run
        assert list(got.values()) == [{"max_tokens": "max_completion_tokens", "temperature": None}]
        # a later judging (another process of the run) sends what the server takes from the start
        res, s = judge_items(items(3, "r"), c, progress=False)
        assert all(r["ok"] for r in res) and len(srv.seen) == 8 + 3
        # the cache keys name what was sent, and answer the same items again
        res, s = judge_items(items(6), c, progress=False)
        assert all(r["ok"] for r in res) and s["calls"] == 0 and len(srv.seen) == 11


def test_judge_params_are_sent_and_keyed(tmp_path, key):
    with Server(lambda req: (200, completion(continuation(OWN)))) as srv:
        low = cfg(tmp_path, srv.url, judge_params='{"reasoning_effort": "low"}')
        assert all(r["ok"] for r in judge_items(items(2), low, progress=False)[0])
        assert [q["reasoning_effort"] for q in srv.seen] == ["low", "low"]
        high = cfg(tmp_path, srv.url, judge_params='{"reasoning_effort": "high"}')
        _, s = judge_items(items(2), high, progress=False)
        assert s["calls"] == 2 and srv.seen[-1]["reasoning_effort"] == "high"  # not low's answers
        assert judge_items(items(2), low, progress=False)[1]["calls"] == 0


def test_requests_spread_over_endpoints_and_a_dead_one_is_skipped(tmp_path, key, capsys):
    answer = lambda req: completion(continuation(OWN))
    with Wire(answer) as a, Wire(answer) as b:
        c = cfg(tmp_path, f"{a.url},{b.url}", concurrency=4, cache="")
        res, _ = judge_items(items(8), c, progress=False)
        assert all(r["ok"] for r in res) and a.requests + b.requests == 8
        assert a.requests >= 2 and b.requests >= 2
        dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
        c = cfg(tmp_path, f"{dead},{a.url}", concurrency=2, retries=2, cache="")
        res, _ = judge_items(items(8, "d"), c, progress=False)
        assert all(r["ok"] for r in res)  # was: --base_url took one endpoint
        err = capsys.readouterr().err
        assert f"endpoint {dead}/chat/completions skipped" in err and "1 of 2 still answer" in err
        # --judge_wait: a silent endpoint is skipped when another answers
        c = cfg(tmp_path, f"http://127.0.0.1:{free_port()}/v1,{b.url}", judge_wait=1.0, cache="")
        res, _ = judge_items(items(2, "w"), c, progress=False)
        assert all(r["ok"] for r in res) and "skipped (no answer within --judge_wait" in \
            capsys.readouterr().err

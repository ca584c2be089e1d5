"""A small OpenAI-compatible HTTP server on 127.0.0.1 that injects faults (tests, benchmarks).

    with FaultServer(faults=["429", "500", "timeout"]) as srv:   # then canned deterministic answers
        OpenAI(base_url=srv.url, api_key="x") ...
    with FaultServer(upstream="http://127.0.0.1:PORT", faults=["garbage"]) as srv:  # a proxy in front of a server

Faults are consumed one per request, in order: "429", "500", "503", "timeout" (answer after `hang`
seconds), "garbage" (HTTP 200, body not JSON), "empty" (HTTP 200, {}), "nonsense" (a well-formed,
billed completion whose text or verdict token means nothing), "nologprobs" (billed, no log-probs),
"401echo" (a 401 whose body echoes the Authorization header, like a careless server), "echo" (a
good verdict whose sampled token is the Authorization header), "escaped_echo" (the same,
\\u-escaped in the JSON), "401", "403", "404", "quota" (429 insufficient_quota), "context" (400
context_length_exceeded). `always`: a fault sent for every request once the list is empty. Without
upstream, normal requests get canned answers: a verdict P(A) = 0.8 * sigmoid((len a - len b) / 10)
+ 0.15 (so 0.05 of position bias toward A, which averaging both orders must cancel) and rubric
scores min(6, len // 5), answered as the paper's Figure 3 asks: one dictionary
{"id1_justification": ..., "id1_score": s1, ...}. `rubric_reply(req)`, when set, writes the rubric
text.
"""
import json, math, re, threading, time, urllib.error, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def canned_p(a, b):
    return 0.8 / (1 + math.exp(-(len(a) - len(b)) / 10)) + 0.15


def canned_score(text):
    return min(6, len(text) // 5)


def canned_reply(req):
    content = req["messages"][-1]["content"]
    usage = {"prompt_tokens": len(content) // 4, "completion_tokens": 1, "total_tokens": len(content) // 4 + 1}
    msg, logprobs = "", None
    if req.get("logprobs"):
        a, b = re.search(r"\[Response A\]\n(.*)\n\n\[Response B\]\n(.*)\n\nReply", content, re.S).groups()
        p = canned_p(a, b)
        top = sorted([("A", math.log(p)), ("B", math.log(1 - p))], key=lambda t: -t[1])
        msg = top[0][0]
        top = [{"token": t, "logprob": lp, "bytes": None} for t, lp in top] + [{"token": " the", "logprob": -9.0,
                                                                                "bytes": None}]
        logprobs = {"content": [{**top[0], "top_logprobs": top[:req.get("top_logprobs", 1) or 1]}]}
    else:
        cands = re.findall(r"\[Candidate (\d+)\]\n(.*?)\n\[End of candidate \1\]", content, re.S)
        reply = {}  # the rubric's output: Figure 3's dictionary
        for i, t in cands:
            why = f"Longer candidates cover more.\nScore: {canned_score(t)}"
            reply[f"id{i}_justification"] = why
            reply[f"id{i}_score"] = canned_score(t)
        msg = json.dumps(reply)
        usage["completion_tokens"] = len(msg) // 4
    return {"id": "x", "object": "chat.completion", "created": 0, "model": req.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": msg}, "logprobs": logprobs,
                         "finish_reason": "stop"}], "usage": usage}


def nonsense_reply(req):
    r = canned_reply(req)
    r["choices"][0]["message"]["content"] = "I cannot decide, they are all lovely."
    if r["choices"][0]["logprobs"]:
        tok = {"token": "zzz", "logprob": -0.1, "bytes": None}
        r["choices"][0]["logprobs"] = {"content": [{**tok, "top_logprobs": [tok]}]}
    return r


class FaultServer:
    def __init__(self, upstream=None, faults=(), hang=2.0, delay=0.0, retry_after="0",
                 idle_timeout=None, always=None, rubric_reply=None):
        self.upstream, self.faults, self.hang, self.delay = upstream, list(faults), hang, delay
        self.always, self.rubric_reply = always, rubric_reply
        self.retry_after = retry_after  # the Retry-After header sent with a 429
        self.lock, self.requests, self.auth_seen, self.inflight, self.max_inflight = threading.Lock(), 0, [], 0, 0
        self.connections = 0  # TCP connections accepted
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = idle_timeout  # seconds a kept-alive connection may sit idle before the server closes it

            def log_message(self, *a):
                pass

            def handle(self):
                try:
                    super().handle()
                except ConnectionResetError:  # a client killed mid-connection (the kill -9 test)
                    pass

            def setup(self):
                super().setup()
                with srv.lock:
                    srv.connections += 1

            def send(self, code, body, headers=()):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers:
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):
                self.send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with srv.lock:
                    srv.requests += 1
                    srv.inflight += 1
                    srv.max_inflight = max(srv.max_inflight, srv.inflight)
                    srv.auth_seen.append(self.headers.get("Authorization", ""))
                    fault = srv.faults.pop(0) if srv.faults else srv.always
                try:
                    self.answer(fault, body)
                finally:
                    with srv.lock:
                        srv.inflight -= 1

            def answer(self, fault, body):
                if srv.delay:
                    time.sleep(srv.delay)
                if fault in ("429", "500", "503"):
                    return self.send(int(fault), {"error": {"message": f"injected {fault}", "type": "x"}},
                                     [("Retry-After", srv.retry_after)] if fault == "429" else [])
                if fault == "401echo":
                    auth = self.headers.get("Authorization")
                    return self.send(401, {"error": {"message": f"bad key {auth}"}})
                errors = {"401": (401, "invalid_api_key"), "403": (403, "forbidden"),
                          "404": (404, "no model"), "quota": (429, "insufficient_quota"),
                          "context": (400, "context_length_exceeded")}
                if fault in errors:
                    code, what = errors[fault]
                    return self.send(code, {"error": {"message": what, "code": what}})
                if fault == "garbage":
                    return self.send(200, b"<html>this is not json")
                if fault == "empty":
                    return self.send(200, {})
                if fault == "timeout":
                    time.sleep(srv.hang)
                req = json.loads(body)
                if fault == "nonsense":
                    return self.send(200, nonsense_reply(req))
                if fault == "nologprobs":
                    r = canned_reply(req)
                    r["choices"][0]["logprobs"] = None
                    return self.send(200, r)
                if fault == "escaped_echo":  # every character \\u-escaped: not in the raw bytes
                    auth = self.headers.get("Authorization")
                    r = canned_reply(req)
                    r["choices"][0]["logprobs"]["content"][0]["token"] = auth
                    escaped = '"' + "".join(f"\\u{ord(c):04x}" for c in auth) + '"'
                    body = json.dumps(r).replace(json.dumps(auth), escaped)
                    return self.send(200, body.encode())
                if fault == "echo":
                    r = canned_reply(req)
                    r["choices"][0]["logprobs"]["content"][0]["token"] = self.headers.get("Authorization")
                    return self.send(200, r)
                if srv.upstream is None:
                    r = canned_reply(req)
                    if srv.rubric_reply and not req.get("logprobs"):
                        r["choices"][0]["message"]["content"] = srv.rubric_reply(req)
                    return self.send(200, r)
                fwd = urllib.request.Request(srv.upstream + self.path, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(fwd, timeout=60) as r:
                        self.send(r.status, r.read())
                except urllib.error.HTTPError as e:
                    self.send(e.code, e.read())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

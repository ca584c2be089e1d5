"""oracle.py: parsing, soft P, both orders, cache, budget, retries, key hygiene -- against a
fault-injecting fake server (tests/fault_proxy.py), a real llama-cpp-python server
(tests/llama_server.py) and model.py."""
import base64, json, math, re, socket, time, warnings

import pytest

import oracle
from dnolib import judging
from dnolib import chat_api, ledger
from dnolib.ledger import BudgetExceeded, OracleError
from oracle import parse_scores, verdict_prob
from oracle import Config, judge_items
from fault_proxy import FaultServer, canned_p, canned_score
from llama_server import MODEL_ALIAS, llama_server  # noqa: F401  (pytest fixture)

KEY = "sk-test-SECRET-7f3a9"
ITEMS = [{"id": f"q{k}", "prompt": f"Say hello #{k}", "candidates": ["hi", "hello there, friend", "hey " * (k + 2)]}
         for k in range(3)]


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return KEY


def api_cfg(tmp_path, url, **kw):
    base = dict(judge="pairwise", base_url=url, judge_model="gpt-4o-mini", cache=str(tmp_path / "cache.jsonl"),
                backoff=0.01, timeout=5.0, concurrency=4, encoding=bpe_file(tmp_path))
    return Config(**{**base, **kw})


def bpe_file(tmp_path):
    """A local tiktoken BPE file (256 bytes + two merges): tests never download OpenAI's
    encodings."""
    path = tmp_path / "tiny.tiktoken"
    if not path.exists():
        toks = [bytes([b]) for b in range(256)] + [b"he", b"hey"]
        path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(toks)))
    return str(path)


def sym_ok(P, tol=1e-9):
    n = len(P)
    return all(abs(P[i][j] + P[j][i] - 1) < tol for i in range(n) for j in range(n))


# ----------------------------------------------------------------------------- parsing
def test_verdict_prob():
    lp = math.log
    assert verdict_prob([("A", lp(0.3)), (" B", lp(0.1)), ("x", lp(0.2))]) == pytest.approx(0.75)
    assert verdict_prob([("A", lp(0.3)), (" B", lp(0.1)), ("x", lp(0.5))]) is None  # mostly x
    assert verdict_prob([("\u2581B", -1.0), ("A", -1.0), ("A", -1.0)]) == pytest.approx(2 / 3)
    assert verdict_prob([("a", 0.0), ("Bee", -1.0)]) == 1.0  # case is normalised


# ----------------------------------------------------------------------------- synthetic judges
@pytest.mark.parametrize("name", ["length", "overlap", "cyclic"])
def test_synthetic_swap_symmetry(name, tmp_path):
    texts = ["a", "b c", "d e f", "the quick brown fox", "say hello to everyone", ""]
    res, summ = judge_items([{"id": "x", "prompt": "say hello", "candidates": texts}],
                            Config(cache=""), fn=judging.resolve(name), progress=False)
    P = res[0]["P"]
    assert res[0]["ok"] and sym_ok(P) and all(P[i][i] == 0.5 for i in range(len(texts)))
    raw = judging.resolve(name)("say hello", texts)  # a judge returning P gets win-rates as its scores
    assert res[0]["score_kind"] == ("winrate" if "P" in raw else judging.score_kind(judging.resolve(name)))
    for a in texts:  # swapping the candidates of a pair gives the complementary probability
        for b in texts:
            ab = judge_items([{"id": "p", "prompt": "say hello", "candidates": [a, b]}], Config(cache=""),
                             fn=judging.resolve(name), progress=False)[0][0]["P"][0][1]
            ba = judge_items([{"id": "p", "prompt": "say hello", "candidates": [b, a]}], Config(cache=""),
                             fn=judging.resolve(name), progress=False)[0][0]["P"][0][1]
            assert ab + ba == pytest.approx(1.0)


def test_cyclic_judge_really_cycles():
    rock, paper, scissors = "one", "one two", "one two three"  # word counts 1, 2, 3
    P = judging.cyclic_judge("", [rock, paper, scissors])["P"]
    assert P[0][2] == 1.0 and P[2][1] == 1.0 and P[1][0] == 1.0  # rock > scissors > paper > rock
    res, _ = judge_items([{"id": "c", "prompt": "", "candidates": [rock, paper, scissors]}], Config(cache=""),
                         fn=judging.cyclic_judge, progress=False)
    assert res[0]["scores"] == [0.5, 0.5, 0.5]  # every candidate wins half: no Condorcet winner


def test_cache_rerun_and_torn_line(tmp_path):
    cfg = Config(cache=str(tmp_path / "c.jsonl"))
    r1, s1 = judge_items(ITEMS, cfg, fn=judging.length_judge, progress=False)
    assert s1["calls"] == 3 and s1["cache_hits"] == 0
    with open(cfg.cache, "a") as f:
        f.write('{"key": "torn", "val')  # a crash in the middle of a line
    r2, s2 = judge_items(ITEMS, cfg, fn=judging.length_judge, progress=False)
    assert s2["calls"] == 0 and s2["cache_hits"] == 3 and all(r["cached"] for r in r2)
    assert [r["P"] for r in r2] == [r["P"] for r in r1]
    judge_items(ITEMS, cfg, fn=judging.overlap_judge, progress=False)  # another judge -> other keys, appended
    lines = open(cfg.cache).read().splitlines()
    assert len(lines) == 7 and sum(1 for ln in lines if ln.startswith('{"key": "torn"')) == 1
    assert judge_items(ITEMS, cfg, fn=judging.overlap_judge, progress=False)[1]["calls"] == 0


# ----------------------------------------------------------------------------- fake server: the client
def test_pairwise_both_orders_average_out_position_bias(tmp_path, key):
    with FaultServer() as srv:
        res, s = judge_items(ITEMS, api_cfg(tmp_path, srv.url), progress=False)
        assert srv.requests == 3 * 6 and s["calls"] == 18  # n(n-1) ordered pairs per item
    for item, r in zip(ITEMS, res):
        c = item["candidates"]
        assert r["ok"] and r["error"] is None and sym_ok(r["P"])
        for i in range(3):
            for j in range(3):
                if i != j:  # the server's +0.05 bias toward "A" cancels exactly
                    want = (canned_p(c[i], c[j]) + 1 - canned_p(c[j], c[i])) / 2
                    assert r["P"][i][j] == pytest.approx(want, abs=1e-9)
                    assert r["P"][i][j] == pytest.approx(0.8 / (1 + math.exp(-(len(c[i]) - len(c[j])) / 10)) + 0.1)
        # hard verdicts disagree across orders only where the length gap is small enough for the bias to flip
        flips = [(canned_p(c[i], c[j]) - .5) * (canned_p(c[j], c[i]) - .5) > 0
                 for i in range(3) for j in range(i + 1, 3)]
        assert r["disagreement"] == pytest.approx(sum(flips) / 3)
        assert r["scores"] == pytest.approx([(r["P"][i][(i + 1) % 3] + r["P"][i][(i + 2) % 3]) / 2 for i in range(3)])
    assert s["tokens_in"] > 0 and s["usd"] > 0 and s["failures"] == {}


def test_rubric_scores_and_cost(tmp_path, key):
    cfg = api_cfg(tmp_path, None, judge="rubric", prices='{"gpt-4o-mini": [1000000, 0]}')
    with FaultServer() as srv:
        cfg.base_url = srv.url
        res, s = judge_items(ITEMS, cfg, progress=False)
    for item, r in zip(ITEMS, res):
        want = [float(canned_score(c)) for c in item["candidates"]]
        assert r["ok"] and r["scores"] == want and "Longer candidates" in r["rationale"]
        assert r["score_kind"] == "rubric"
        assert r["P"][0][1] == (0.5 if want[0] == want[1] else float(want[0] > want[1]))
    assert s["usd"] == pytest.approx(s["tokens_in"])  # $1 per input token by the overriding price table


def test_faults_are_retried(tmp_path, key):
    faults = ["429", "500", "503", "timeout", "garbage", "empty"]
    with FaultServer(faults=faults, hang=1.0) as srv:
        res, s = judge_items(ITEMS, api_cfg(tmp_path, srv.url, timeout=0.3, concurrency=2), progress=False)
    assert all(r["ok"] for r in res) and s["failures"] == {}
    assert s["retries"] == len(faults) and s["calls"] == 18 + len(faults)


def test_retry_after_is_honoured(tmp_path, key):
    with FaultServer(faults=["429"], retry_after="0.6") as srv:
        t0 = time.perf_counter()
        res, s = judge_items(ITEMS[:1], api_cfg(tmp_path, srv.url, concurrency=1, backoff=0.01), progress=False)
    assert time.perf_counter() - t0 >= 0.6 and s["retries"] == 1 and res[0]["ok"]


def test_faults_after_retries_are_counted_failures(tmp_path, key):
    faults = ["500", "500", "nonsense"]  # one request fails twice (retries=1), the next answers nonsense
    cfg = api_cfg(tmp_path, None, concurrency=1, retries=1, shuffle=False)
    with FaultServer(faults=faults) as srv:
        cfg.base_url = srv.url
        res, s = judge_items(ITEMS[:1], cfg, progress=False)
        assert s["failures"] == {"server_error": 1, "no_verdict": 1} and s["calls"] == 7
        r = res[0]
        assert not r["ok"] and r["error"].startswith(("server_error", "no_verdict")) and "(+1 more)" in r["error"]
        # units go (0,1), (0,2), (1,0), ...: pairs {0,1} and {0,2} are unknown, never a default winner
        assert [r["P"][0][1], r["P"][1][0], r["P"][0][2], r["P"][2][0]] == [None] * 4
        assert r["P"][1][2] + r["P"][2][1] == pytest.approx(1.0) and r["scores"][0] is None
        res2, s2 = judge_items(ITEMS[:1], cfg, progress=False)  # the outage is re-asked, the billed
        assert s2["calls"] == 1 and s2["cache_hits"] == 5 and not res2[0]["ok"]  # nonsense is not
        cfg.retry_unreadable = True
        res2, s2 = judge_items(ITEMS[:1], cfg, progress=False)
        assert s2["calls"] == 1 and s2["cache_hits"] == 5 and res2[0]["ok"]
        cfg.retry_unreadable = False
        cfg.judge, cfg.retries = "rubric", 0
        srv.faults = ["nonsense"]
        r3, s3 = judge_items(ITEMS[:1], cfg, progress=False)
        assert s3["failures"] == {"parse": 1} and r3[0]["scores"] == [None] * 3 and not r3[0]["ok"]


def test_concurrency(tmp_path, key):
    with FaultServer(delay=0.05) as srv:
        res4, _ = judge_items(ITEMS, api_cfg(tmp_path, srv.url, concurrency=4, cache=""), progress=False)
        assert srv.max_inflight >= 3
    with FaultServer(delay=0.0) as srv:
        res1, _ = judge_items(ITEMS, api_cfg(tmp_path, srv.url, concurrency=1, cache=""), progress=False)
        assert srv.max_inflight == 1
    assert [r["P"] for r in res4] == [r["P"] for r in res1]


def test_connections_are_reused_and_stale_ones_replaced(tmp_path, key):
    cfg = api_cfg(tmp_path, None, cache="", concurrency=2)
    with FaultServer(idle_timeout=0.3) as srv:
        cfg.base_url = srv.url
        judge_items(ITEMS, cfg, progress=False)
        assert srv.requests == 18 and srv.connections <= 2  # keep-alive: one connection per worker
        time.sleep(0.6)  # the server drops the idle connections; the client resends on fresh ones, no retry
        res, s = judge_items(ITEMS, cfg, progress=False)
        assert all(r["ok"] for r in res) and s["retries"] == 0 and s["failures"] == {} and srv.requests == 36


def test_budget_stop_and_resume(tmp_path, key):
    cfg = api_cfg(tmp_path, None, max_calls=5, concurrency=3)
    with FaultServer() as srv:
        cfg.base_url = srv.url
        with pytest.raises(BudgetExceeded) as e:
            judge_items(ITEMS, cfg, progress=False)
        assert srv.requests == 5 and e.value.summary["calls"] == 5 and "max_calls" in str(e.value)
        assert sum(1 for _ in open(cfg.cache)) == 5 and not any(r["ok"] for r in e.value.results)
        cfg.max_calls = 0
        res, s = judge_items(ITEMS, cfg, progress=False)
        assert s["calls"] == 13 and s["cache_hits"] == 5 and all(r["ok"] for r in res)
    # dollars: each request is priced before it is sent, so the ledger never passes max_usd
    cfg = api_cfg(tmp_path, None, cache="", prices='{"m": [1000, 1000]}', judge_model="m", max_usd=0.9)
    with FaultServer() as srv:
        cfg.base_url = srv.url
        with pytest.raises(BudgetExceeded) as e:
            judge_items(ITEMS, cfg, progress=False)
    assert 0 < e.value.summary["usd"] <= 0.9 and e.value.summary["calls"] < 18


def test_interrupt_stops_sending_and_keeps_answers(tmp_path, key):
    import signal, threading
    items = [{"id": str(k), "prompt": "p", "candidates": ["a" * k, "b", "c"]} for k in range(20)]  # 120 requests
    cfg = api_cfg(tmp_path, None, concurrency=2)
    # Ctrl-C as a terminal sends it: a real SIGINT to the main thread, Python's own handler installed
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    main = threading.main_thread().ident
    with FaultServer(delay=0.02) as srv:
        cfg.base_url = srv.url
        def ctrl_c():  # in the middle of the run
            while srv.requests < 10:
                time.sleep(0.005)
            signal.pthread_kill(main, signal.SIGINT)
        threading.Thread(target=ctrl_c, daemon=True).start()
        try:
            with pytest.raises(KeyboardInterrupt):
                judge_items(items, cfg, progress=False)
        finally:
            signal.signal(signal.SIGINT, saved)
        sent = srv.requests
        time.sleep(0.3)
        assert 10 <= sent < 30 and srv.requests == sent  # nothing more is sent after the interrupt
    assert sum(1 for _ in open(cfg.cache)) >= sent - 2  # answers that landed are saved (<= 2 were in flight)


def test_missing_key_and_unknown_price(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(OracleError, match="OPENAI_API_KEY"):
        judge_items(ITEMS, api_cfg(tmp_path, "http://127.0.0.1:9/v1"), progress=False)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with pytest.raises(OracleError, match="no price"):
        judge_items(ITEMS, api_cfg(tmp_path, "http://127.0.0.1:9/v1", judge_model="mystery", max_usd=1.0), progress=False)


def test_api_key_never_on_disk(tmp_path, key, capsys):
    samples = tmp_path / "s.jsonl"
    samples.write_text("".join(json.dumps({"id": i["id"], "prompt": i["prompt"],
                                           "samples": i["candidates"][:2], "gold": i["candidates"][2]})
                               + "\n" for i in ITEMS))
    out = tmp_path / "j.jsonl"
    argv = ["--judge", "pairwise", "--judge_model", "gpt-4o-mini", "--samples", str(samples),
            "--out", str(out), "--cache", str(tmp_path / "c.jsonl"), "--concurrency", "1",
            "--encoding", bpe_file(tmp_path), "--retries", "0", "--max_failure_rate", "1"]
    with FaultServer(faults=["echo"]) as srv:  # a server that echoes the Authorization header back
        oracle.main(argv + ["--base_url", srv.url])
        assert any(KEY in a for a in srv.auth_seen)  # the key did travel, in the header
    recs = [json.loads(ln) for ln in open(out)]
    assert [r["gold_index"] for r in recs] == [2, 2, 2] and all(r["ok"] for r in recs)
    assert "Bearer ***" in (tmp_path / "c.jsonl").read_text()  # the echoed answer was cached, scrubbed
    (tmp_path / "c.jsonl").unlink()
    with FaultServer(faults=["401echo"]) as srv:  # a 401 echoing it: the run stops, in one line
        with pytest.raises(SystemExit, match="HTTP 401") as e:
            oracle.main(argv + ["--base_url", srv.url])
    assert "***" in str(e.value) and "\n" not in str(e.value) and KEY not in str(e.value)
    cap = capsys.readouterr()
    assert "judged 3 items (3 ok)" in cap.out
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert KEY not in p.read_text(errors="ignore"), p
    assert KEY not in cap.out + cap.err


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(OracleError, match="need 'id', 'prompt' and 'candidates'"):
        judge_items([{"id": "x", "prompt": "p", "candidates": "not a list"}], Config(cache=""), fn=judging.length_judge)
    with pytest.raises(OracleError, match="judge_params"):
        judge_items(ITEMS, Config(cache="", judge="pairwise", judge_params="[1"), progress=False)
    with pytest.raises(OracleError, match="returned"):
        judge_items(ITEMS, Config(cache=""), fn=lambda p, c: {"scores": [1.0]}, progress=False)


def test_cli_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the CLI's default --out / --cache land here, not in the repo
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "x", "samples": ["a"]}\n{"id": 2, "prompt": \n')
    with pytest.raises(SystemExit, match=r"^error: .*bad.jsonl:2: bad samples line"):
        oracle.main(["--judge", "length", "--samples", str(bad), "--cache", ""])
    with pytest.raises(SystemExit, match="error: .*No such file"):
        oracle.main(["--judge", "length", "--samples", str(tmp_path / "missing.jsonl")])
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"prompt": "x", "samples": ["a", "b"]}\n')
    with pytest.raises(SystemExit, match="^error: unknown --judge 'nope'"):
        oracle.main(["--judge", "nope", "--samples", str(ok)])


def test_tiktoken_counts_truncation_and_offline_fallback(tmp_path, key):
    enc = chat_api.get_encoder(bpe_file(tmp_path))
    assert enc.encode("hey hey") == [257, 32, 257] and chat_api.count_tokens(enc, "hey hey") == 3
    long = "hey " * 40  # 80 tokens
    with FaultServer() as srv:
        res, _ = judge_items([{"id": "t", "prompt": "p", "candidates": ["hi", long]}],
                             api_cfg(tmp_path, srv.url, max_judge_tokens=10, cache=""), progress=False)
    assert res[0]["truncated"] == [1] and res[0]["max_judge_tokens"] == 10
    assert chat_api.truncate(enc, long, 10) == ("hey hey hey hey hey ", True)
    assert chat_api.get_encoder("no-such-encoding") is None  # approximate counts (the warning: test_f10)
    assert chat_api.count_tokens(None, "x" * 41) == 11 and chat_api.truncate(None, "x" * 41, 10) == ("x" * 40, True)


# ----------------------------------------------------------------------------- the real server (llama.cpp)
def real_cfg(tmp_path, url, **kw):
    return api_cfg(tmp_path, url, **{"judge_model": MODEL_ALIAS, "judge_params": '{"repeat_penalty": 1.0}', **kw})


def test_real_server_pairwise_soft_p_and_cache(tmp_path, key, llama_server):
    from openai import OpenAI
    cfg = real_cfg(tmp_path, llama_server, concurrency=4)
    res, s = judge_items(ITEMS, cfg, progress=False)
    assert s["calls"] == 18 and s["failures"] == {} and all(r["ok"] for r in res)
    for r in res:
        assert sym_ok(r["P"]) and all(0 < x < 1 for row in r["P"] for x in row)
    assert len({round(x, 6) for r in res for row in r["P"] for x in row}) > 5  # soft, context-dependent
    # the soft P equals the one recomputed from a direct request's top log-probs, both orders averaged
    units, _, _ = oracle.plan_item(ITEMS[0], cfg, None, oracle.encoder(cfg.judge_model, cfg.encoding), cfg.judge_model)
    client = OpenAI(base_url=llama_server, api_key="x")
    p = {}
    for u in units[:2]:  # orders (0, 1) and (0, 2) ...
        for uu in units:
            if uu["pair"] in (u["pair"], u["pair"][::-1]):
                out = client.chat.completions.create(model=MODEL_ALIAS, messages=uu["messages"], max_tokens=1,
                                                     temperature=0, logprobs=True, top_logprobs=5,
                                                     extra_body={"repeat_penalty": 1.0})
                top = out.choices[0].logprobs.content[0].top_logprobs
                pa = sum(math.exp(t.logprob) for t in top if oracle.verdict_letter(t.token) == "A")
                pb = sum(math.exp(t.logprob) for t in top if oracle.verdict_letter(t.token) == "B")
                p[uu["pair"]] = pa / (pa + pb)
    assert res[0]["P"][0][1] == pytest.approx((p[0, 1] + 1 - p[1, 0]) / 2, abs=1e-6)
    res2, s2 = judge_items(ITEMS, cfg, progress=False)  # rerun: zero requests
    assert s2["calls"] == 0 and s2["cache_hits"] == 18 and [r["P"] for r in res2] == [r["P"] for r in res]


def test_real_server_rubric(tmp_path, key, llama_server):
    n = 3  # a grammar makes the random model answer as Figure 3 asks: the rest of the prefilled dictionary
    g = ('root ::= j "\\", \\"id1_score\\": " [0-6] '
         + " ".join(f'", \\"id{i}_justification\\": \\"" j "\\", \\"id{i}_score\\": " [0-6]'
                    for i in range(2, n + 1)) + ' "}"\nj ::= [a-z] [a-z]? [a-z]?')
    cfg = real_cfg(tmp_path, llama_server, judge="rubric", max_new_tokens=200, timeout=60.0,
                   judge_params=json.dumps({"repeat_penalty": 1.0, "grammar": g}))
    res, s = judge_items(ITEMS, cfg, progress=False)
    assert all(r["ok"] for r in res) and s["calls"] == 3 and s["tokens_out"] > 0, res[0]["rationale"]
    for r in res:
        assert re.fullmatch(r'[a-z]{1,3}", "id1_score": \d(, "id\d_justification": "[a-z]{1,3}", '
                            r'"id\d_score": \d){2}\}', r["rationale"]), r["rationale"]
        shown = parse_scores(r["rationale"], n)  # the judge scored the candidates in the order it saw them
        assert [r["scores"][k] for k in r["order"]] == shown and all(x in range(7) for x in shown)


def test_real_server_behind_fault_proxy_and_budget(tmp_path, key, llama_server):
    with FaultServer(upstream=llama_server[:-3], faults=["429", "500", "garbage", "timeout"],
                     hang=4.0) as srv:                  # a loaded machine answers slowly: room to spare
        cfg = real_cfg(tmp_path, srv.url, timeout=2.0, max_calls=10)
        with pytest.raises(BudgetExceeded) as e:
            judge_items(ITEMS, cfg, progress=False)
        assert e.value.summary["calls"] == 10 and e.value.summary["retries"] == 4
        assert sum(1 for _ in open(cfg.cache)) == 6  # 10 sends - 4 faults = 6 judgments, all saved
        cfg.max_calls = 0
        res, s = judge_items(ITEMS, cfg, progress=False)
        assert all(r["ok"] for r in res) and s["calls"] == 12 and s["cache_hits"] == 6


# ----------------------------------------------------------------------------- the local judge (model.py)
def test_local_judge_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    tiny = pytest.importorskip("tiny")
    pytest.importorskip("model")
    torch.set_num_threads(1)
    hf = tiny.make_hf_model("llama", None, max_position_embeddings=2048)
    with torch.no_grad():
        for name, w in hf.named_parameters():  # sharp attention and peaky verdicts: order and content matter
            w.mul_(200.0 if "lm_head" in name else 20.0 if ("q_proj" in name or "k_proj" in name) else 1.0)
    hf.save_pretrained(str(tmp_path / "j"))
    tok = tiny.make_tokenizer(tmp_path / "j")
    items = [{"id": "l", "prompt": "Say hi", "candidates": ["hi", "hello there", "hey you"]}]
    cfg = Config(judge="local", judge_model=str(tmp_path / "j"), cache="", local_batch_size=4)
    res, s = judge_items(items, cfg, progress=False)
    assert res[0]["ok"] and s["calls"] == 6 and sym_ok(res[0]["P"])
    units, _, _ = oracle.plan_item(items[0], cfg, None, None, "x")
    p = {}
    A, B = tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")
    for u in units:  # the slow, obvious path: transformers, one unpadded prompt at a time
        ids = tok.apply_chat_template(u["messages"], add_generation_prompt=True, return_dict=False)
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1], -1)
        p[u["pair"]] = lp[A].exp().item() / (lp[A].exp().item() + lp[B].exp().item())
    for (i, j) in p:
        assert res[0]["P"][i][j] == pytest.approx((p[i, j] + 1 - p[j, i]) / 2, abs=1e-4)
    assert max(abs(x - 0.5) for row in res[0]["P"] for x in row) > 0.05



def test_local_judge_loads_a_hub_id_from_the_cache(tmp_path, monkeypatch):
    """--local_model ORG/NAME resolves like transformers (the cached snapshot, offline here): the
    same P as the folder; an id that is not cached, or no model at all, is a one-line
    OracleError."""
    tiny = pytest.importorskip("tiny")
    pytest.importorskip("model")
    tiny.make_hf_model("qwen2", tmp_path / "j")
    tiny.hub_snapshot(tiny.offline_hub(tmp_path, monkeypatch), "tiny-org/judge", tmp_path / "j")
    items = [{"id": "h", "prompt": "Say hi", "candidates": ["hi", "hello there"]}]
    P = {}
    for name in (str(tmp_path / "j"), "tiny-org/judge"):
        res, s = judge_items(items, Config(judge="local", judge_model=name, cache=""), progress=False)
        assert res[0]["ok"] and s["calls"] == 2
        P[name] = res[0]["P"]
    assert P["tiny-org/judge"] == P[str(tmp_path / "j")] and P["tiny-org/judge"][0][1] != 0.5
    for name, says in [("tiny-org/missing", "--judge_model tiny-org/missing: not in the Hugging Face cache"),
                       ("", "--judge_model is empty")]:
        with pytest.raises(OracleError, match=says) as e:
            judge_items(items, Config(judge="local", judge_model=name, cache=""), progress=False)
        assert "\n" not in str(e.value)

# ----------------------------------------------------------------------------- budget for the whole run
def test_ledger_budget_holds_across_calls_and_resumes(tmp_path, key):
    ledger = tmp_path / "run" / "ledger.json"
    cfg = api_cfg(tmp_path, None, ledger=str(ledger), max_calls=10, concurrency=2)
    with FaultServer() as srv:
        cfg.base_url = srv.url
        r1, s1 = judge_items(ITEMS[:1], cfg, progress=False)  # 6 of the run's 10 requests
        assert s1["calls"] == 6 and s1["run"]["calls"] == 6 and json.loads(ledger.read_text())["calls"] == 6
        with pytest.raises(BudgetExceeded) as e:  # the next call may only send 4 more
            judge_items(ITEMS, cfg, progress=False)
        assert srv.requests == 10 and e.value.summary["calls"] == 4 and e.value.summary["run"]["calls"] == 10
        assert "\n" not in str(e.value) and "max_calls 10" in str(e.value)
        with pytest.raises(BudgetExceeded):  # a resumed run (new process, same ledger) sends nothing
            judge_items(ITEMS, cfg, progress=False)
        assert srv.requests == 10
        saved = json.loads(ledger.read_text())
        assert saved["calls"] == 10 and saved["tokens_in"] > 0 and saved["usd"] > 0
        cfg.max_calls = 18  # raising the budget resumes: only the 8 unanswered requests are sent
        res, s = judge_items(ITEMS, cfg, progress=False)
        assert all(r["ok"] for r in res) and srv.requests == 18 and s["run"]["calls"] == 18
    # free in-process judges: the count is exact at the end
    fcfg = Config(cache="", ledger=str(tmp_path / "fn.json"), max_calls=4, shuffle=False)
    judge_items(ITEMS[:2], fcfg, fn=judging.length_judge, progress=False)
    with pytest.raises(BudgetExceeded):
        judge_items(ITEMS, fcfg, fn=judging.length_judge, progress=False)
    assert json.loads((tmp_path / "fn.json").read_text())["calls"] == 4


def test_ledger_is_on_disk_before_the_request_leaves(tmp_path):
    path = tmp_path / "l.json"
    led = ledger.Ledger((1e6, 0.0), max_usd=10.0, path=str(path))
    ticket = led.spend(3, 100)  # reserved, not settled: a kill -9 now must still count it
    assert json.loads(path.read_text()) == {"calls": 1, "retries": 0, "tokens_in": 0, "tokens_out": 0,
                                            "usd": 0.0, "reserved": {ticket: 3.0}}
    after = ledger.Ledger((1e6, 0.0), path=str(path)).totals()  # worst case kept after the kill
    assert after["usd"] == 3.0 and after["unsettled"] == 1
    led.settle(ticket, 2, 7)
    assert json.loads(path.read_text())["reserved"] == {} and led.totals()["usd"] == 2.0
    path.write_text("{not json")
    with pytest.raises(OracleError, match="ledger .* unreadable"):
        ledger.Ledger((0.0, 0.0), path=str(path))


# ----------------------------------------------------------------------------- outages: the circuit breaker
def test_breaker_stops_a_closed_port(tmp_path, key):
    with socket.socket() as s:  # a port where nothing listens any more
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    items = [{"id": str(k), "prompt": "p", "candidates": ["a" * k, "b", "c"]} for k in range(50)]  # 300 requests
    cfg = api_cfg(tmp_path, f"http://127.0.0.1:{port}/v1", retries=4, backoff=0.01, breaker=8, concurrency=4)
    with pytest.raises(oracle.JudgeUnavailable) as e:
        judge_items(items, cfg, progress=False)
    msg = str(e.value)
    assert f"127.0.0.1:{port}" in msg and "refused" in msg.lower() and "\n" not in msg
    # each request tries 3 times (refused connections get 2 retries, not 4); at most `concurrency` were in flight
    fails = e.value.summary["failures"]  # 8 trip it; at most 3 others were on their last try at that moment
    assert list(fails) == ["connection"] and 8 <= fails["connection"] <= 8 + 3
    assert 8 * 3 <= e.value.summary["calls"] <= (8 + 4) * 3
    assert isinstance(e.value, OracleError) and not (tmp_path / "cache.jsonl").exists()


def test_breaker_with_fault_proxy_and_rerun_asks_exactly_the_failures(tmp_path, key):
    cfg = api_cfg(tmp_path, None, retries=1, breaker=3, concurrency=1, shuffle=False)
    with FaultServer(faults=[None, None] + ["500", "503"] * 3) as srv:  # 2 answers, then an outage
        cfg.base_url = srv.url
        with pytest.raises(oracle.JudgeUnavailable, match="HTTP 503") as e:
            judge_items(ITEMS, cfg, progress=False)
        assert srv.requests == 2 + 3 * 2 and e.value.summary["failures"] == {"server_error": 3}
        assert not any(r["ok"] for r in e.value.results) and "judge unavailable" in e.value.results[1]["error"]
        assert sum(1 for _ in open(cfg.cache)) == 2  # the answers are cached, the failures are not
        res, s = judge_items(ITEMS, cfg, progress=False)  # the endpoint is back
        assert all(r["ok"] for r in res) and s["cache_hits"] == 2 and s["calls"] == 16 and srv.requests == 24
    with FaultServer(faults=["500", None, "500"]) as srv:  # a success in between resets the count: no trip
        res, s = judge_items(ITEMS[:1], api_cfg(tmp_path, srv.url, retries=0, breaker=2, concurrency=1, cache="",
                                                 shuffle=False), progress=False)
        assert s["failures"] == {"server_error": 2} and srv.requests == 6
    cfg.breaker = 0  # 0 = never trip
    with FaultServer(faults=["500"] * 40) as srv:
        cfg.base_url, cfg.cache = srv.url, ""
        _, s = judge_items(ITEMS, cfg, progress=False)
        assert s["failures"] == {"server_error": 18}


# ----------------------------------------------------------------------------- shuffling and position bias
def test_shuffle_hides_the_gold_slot_and_maps_scores_back(tmp_path):
    shown = []

    def by_content(prompt, candidates):  # scores by content: "c3" gets 3 wherever it is shown
        shown.append(list(candidates))
        return {"scores": [float(c[1]) for c in candidates]}
    items = [{"id": f"q{k}", "prompt": f"p{k}", "candidates": ["c0", "c1", "c2", "c3", "c4", "c5"], "gold_index": 5}
             for k in range(20)]
    res, _ = judge_items(items, Config(cache=""), fn=by_content, progress=False)
    assert sum(s[-1] != "c5" for s in shown) >= 10  # the gold is mostly NOT in the last slot (5/6 expected)
    assert len({tuple(s) for s in shown}) > 10  # orders differ per item
    for r, s in zip(res, shown):
        assert r["scores"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and r["P"][5][0] == 1.0 and r["P"][0][5] == 0.0
        assert [f"c{k}" for k in r["order"]] == s  # order[k]: the original index of the candidate in slot k
    again, _ = judge_items(items, Config(cache=""), fn=by_content, progress=False)
    assert [r["order"] for r in again] == [r["order"] for r in res]  # seeded: stable across reruns
    other, _ = judge_items(items, Config(cache="", seed=1), fn=by_content, progress=False)
    assert [r["order"] for r in other] != [r["order"] for r in res]
    shown.clear()  # opting out, per item or for the run: the judge sees the given order
    judge_items([{**items[0], "shuffle": False}], Config(cache=""), fn=by_content, progress=False)
    judge_items(items[:1], Config(cache="", shuffle=False), fn=by_content, progress=False)
    assert shown == [items[0]["candidates"]] * 2


def test_position_audit_measures_a_first_slot_bias(tmp_path):
    def first_slot_bonus(prompt, candidates):  # length / 2 plus 3 points for whoever is shown first
        return {"scores": [len(c) / 2 + (3.0 if k == 0 else 0.0) for k, c in enumerate(candidates)]}
    items = [{"id": f"q{k}", "prompt": f"p{k}", "candidates": ["aa", "aaaa"]} for k in range(40)]
    cfg = Config(cache=str(tmp_path / "c.jsonl"), position_audit=0.5)
    res, s = judge_items(items, cfg, fn=first_slot_bonus, progress=False)
    audited = [r for r in res if "audit" in r]
    assert 10 <= len(audited) <= 30 and s["position"]["items"] == len(audited) and s["calls"] == 40 + len(audited)
    for r in audited:  # the shown-first candidate always wins: the preference flips with the order
        assert r["audit"]["order"] == r["order"][::-1] and r["audit"]["ok"]
        assert r["scores"][r["order"][0]] > r["scores"][r["order"][1]]
        assert r["audit"]["scores"][r["order"][1]] > r["audit"]["scores"][r["order"][0]]
    assert s["position"]["rank_disagreement"] == 1.0 and s["position"]["first_slot_advantage"] == 1.0
    res2, s2 = judge_items(items, cfg, fn=first_slot_bonus, progress=False)  # same sample on a rerun, all cached
    assert s2["calls"] == 0 and [("audit" in r) for r in res2] == [("audit" in r) for r in res]
    _, s3 = judge_items(items, Config(cache="", position_audit=1.0), fn=judging.length_judge, progress=False)
    assert s3["position"] == {"items": 40, "rank_disagreement": 0.0, "first_slot_advantage": 0.0}  # unbiased


def test_rubric_audit_against_a_biased_server(tmp_path, key):
    # the fake server scores by length; the audit of an order-free judge finds no flips
    with FaultServer() as srv:
        res, s = judge_items(ITEMS, api_cfg(tmp_path, srv.url, judge="rubric", position_audit=1.0), progress=False)
    assert s["calls"] == 6 and s["position"]["rank_disagreement"] == 0.0
    assert all(r["audit"]["scores"] == r["scores"] for r in res)


# ----------------------------------------------------------------------------- fn judges with structured inputs
def test_fn_judges_old_and_structured_signatures(tmp_path):
    seen = {}

    def old(prompt, candidates):
        seen["old"] = prompt
        return {"scores": [float(len(c)) for c in candidates]}

    def new(prompt, candidates, messages=None, gold=None, id=None):
        seen["new"] = (prompt, messages, gold, id, list(candidates))
        return {"scores": [6.0 if c == gold else 1.0 for c in candidates]}
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi?"}]
    item = {"id": "m1", "prompt": msgs, "candidates": ["yo", "hello", "GOLD"], "gold_index": 2}
    judge_items([item], Config(cache=""), fn=old, progress=False)
    assert seen["old"] == "system: be brief\nuser: hi?"
    res, _ = judge_items([item], Config(cache=""), fn=new, progress=False)
    prompt, m, gold, iid, cands = seen["new"]
    assert prompt == seen["old"] and m == msgs and gold == "GOLD" and iid == "m1"
    assert cands == [item["candidates"][k] for k in res[0]["order"]] and res[0]["scores"] == [1.0, 1.0, 6.0]
    kw = lambda prompt, candidates, **kw: {"scores": [float(kw["gold"] is None)] * len(candidates)}
    assert judge_items([{"id": "s", "prompt": "x", "candidates": ["a"]}], Config(cache=""), fn=kw,
                       progress=False)[0][0]["scores"] == [1.0]  # a text prompt: messages=None; no gold: gold=None


def test_load_fn(tmp_path, monkeypatch):
    (tmp_path / "myjudges.py").write_text("def judge(p, c):\n    return {'scores': [1.0] * len(c)}\nNOT_FN = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert judging.resolve("myjudges:judge")("p", ["a"]) == {"scores": [1.0]}
    for spec, msg in (("no_such_mod_xyz:judge", "cannot import module"), ("myjudges:nope", "no attribute 'nope'"),
                      ("myjudges:NOT_FN", "not callable")):
        with pytest.raises(OracleError, match=msg) as e:
            judging.resolve(spec)
        assert "\n" not in str(e.value)
    res, _ = judge_items(ITEMS, Config(cache="", judge="myjudges:judge"), progress=False)  # --judge module:function
    assert all(r["ok"] and r["scores"] == [1.0] * 3 for r in res)


# ----------------------------------------------------------------------------- fitting the judge's context
def test_candidates_are_cut_only_when_the_request_would_not_fit(tmp_path, key):
    long = "hey " * 40  # 80 tokens with the test BPE
    items = [{"id": "t", "prompt": "p", "candidates": ["hi", long, long]}]
    with FaultServer() as srv:
        cfg = api_cfg(tmp_path, srv.url, judge="rubric", cache="", max_new_tokens=50, shuffle=False)
        units, _, _ = oracle.plan_item(items[0], cfg, None, oracle.encoder(cfg.judge_model, cfg.encoding), cfg.judge_model)
        fixed = units[0]["n_in"] - 10 + 50 - sum(chat_api.count_tokens(oracle.encoder(cfg.judge_model, cfg.encoding), c) for c in
                                                  items[0]["candidates"])  # the request without candidates
        cfg.judge_context = fixed + 175  # room for ~175 tokens of candidates (BPE joins at the seams vary by a few):
        # 2 + 80 + 80 fits
        res, s = judge_items(items, cfg, progress=False)
        assert res[0]["truncated"] == [] and s["truncated"] == 0 and res[0]["max_judge_tokens"] is None
        cfg.judge_context = fixed + 120  # 162 > ~120: each candidate gets ~120 // 3 = 40 tokens, "hi" needs no cut
        res, s = judge_items(items, cfg, progress=False)
        assert res[0]["truncated"] == [1, 2] and s["truncated"] == 2 and 36 <= res[0]["max_judge_tokens"] <= 44
        cfg.judge, cfg.judge_context = "pairwise", 10 ** 6  # the default context fits everything here
        assert judge_items(items, cfg, progress=False)[0][0]["truncated"] == []


def test_pairwise_judges_are_not_audited(tmp_path, key):
    with FaultServer() as srv:  # they already judge each pair in both orders: "order_disagreement" measures them
        res, s = judge_items(ITEMS, api_cfg(tmp_path, srv.url, position_audit=1.0, cache=""), progress=False)
    assert s["calls"] == 18 and s["position"]["items"] == 0 and not any("audit" in r for r in res)


def test_kill_9_keeps_the_run_budget(tmp_path, key):
    import signal, subprocess, sys
    script = tmp_path / "run.py"
    script.write_text(f"import sys; sys.path[:0] = {[str(oracle.os.path.dirname(oracle.__file__))]!r}\n"
                      "import oracle\n"
                      "items = [{'id': str(k), 'prompt': 'p', 'candidates': ['a' * k, 'b', 'c']} for k in range(100)]\n"
                      f"cfg = oracle.Config(judge='pairwise', base_url=sys.argv[1], judge_model='gpt-4o-mini', "
                      f"cache={str(tmp_path / 'c.jsonl')!r}, ledger={str(tmp_path / 'l.json')!r}, concurrency=4, "
                      f"encoding={bpe_file(tmp_path)!r}, max_calls=150)\n"
                      "try:\n    oracle.judge_items(items, cfg, progress=False)\n"
                      "except oracle.BudgetExceeded as e:\n    print(e)\n")
    with FaultServer(delay=0.02) as srv:
        p = subprocess.Popen([sys.executable, str(script), srv.url])
        while srv.requests < 40 and p.poll() is None:
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
        p.wait()
        sent, saved = srv.requests, json.loads((tmp_path / "l.json").read_text())["calls"]
        assert sent <= saved <= sent + 4  # the ledger was on disk before each request left (4 in flight at most)
        out = subprocess.run([sys.executable, str(script), srv.url], capture_output=True, text=True, timeout=120)
        assert "max_calls 150 reached" in out.stdout and srv.requests <= 150  # the resumed run stops at the budget
    assert json.loads((tmp_path / "l.json").read_text())["calls"] == 150

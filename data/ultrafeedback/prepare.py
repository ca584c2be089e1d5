"""prepare_data.py: UltraFeedback-style data -> the prompts JSONL that train.py reads (x ~ rho, with
y_gold).

Usage:
    python prepare_data.py                                  # demo: converts a few built-in rows and prints them
    python prepare_data.py --source uf.jsonl --out prompts.jsonl --limit 2000 --seed 0      # a local file or folder
    python prepare_data.py --source openbmb/UltraFeedback --out prompts.jsonl               # needs `pip install datasets`
    python prepare_data.py --source HuggingFaceH4/ultrafeedback_binarized --split train_prefs --out prompts.jsonl

Output lines: {"id": str, "prompt": [{"role": "user", "content": str}], "gold": str}; train.py
--prompts reads them. --source: a .jsonl / .json / .parquet file (.parquet needs pyarrow), a folder
of such files (with --split, only the files named <split>-* or <split>.*), or a Hugging Face dataset
name owner/name (needs `datasets`). Layouts, detected per row:
    openbmb/UltraFeedback                  {"instruction", "completions": [{"model", "response",
                                            "overall_score", "fine-grained_score", ...}], ...}; id =
                                            "uf-" + sha1(instruction)[:16]
    HuggingFaceH4/ultrafeedback_binarized  {"prompt", "prompt_id", "chosen" | "messages": [{"role",
                                            "content"}, ...], ...}; id = prompt_id, gold = the last
                                            assistant turn of chosen / messages

Departures from the paper (numbered):
    1. The gold response. The paper collected a fresh GPT-4-Turbo answer for every prompt (Sec.
       5.1); UltraFeedback holds no GPT-4-Turbo completions. We take the completion of --gold_model
       (default "gpt-4") when the row has one, else (--gold_fallback best) the highest-rated
       completion by overall_score, then fine-grained_score (first one on ties), or drop the prompt
       (--gold_fallback skip). The binarized layout keeps no model names: its gold is always the
       chosen (highest-rated) response. To follow the paper, regenerate the gold with a strong
       teacher and overwrite the "gold" field.
    2. Prompts are compared after stripping whitespace; a repeated prompt keeps its first row. Empty
       prompts, rows with no usable gold, and repeats are skipped and counted.
    3. --limit N keeps a seeded random N of the kept rows (--seed), written in source order.
"""
import glob
import hashlib
import json
import math
import os
import random
import re
import sys
from dataclasses import dataclass

from dnolib.cli import check, cli


@dataclass
class Config:
    source: str = ""                # input: file, folder or HF dataset name; "" = the built-in demo rows
    out: str = "prompts.jsonl"      # output JSONL
    split: str = ""                 # HF split ("" = train), or the file-name prefix inside a folder ("" = all files)
    gold_model: str = "gpt-4"       # take this model's completion as the gold ("" = always the highest-rated)
    gold_fallback: str = "best"     # when gold_model has no completion: best (highest-rated) | skip (drop the prompt)
    limit: int = 0                  # keep at most this many prompts, a seeded random subset (0 = all)
    seed: int = 0                   # seed of the --limit subset


CHOICES = {"gold_fallback": ("best", "skip")}  # checked by cli.check with LIMITS before any work
LIMITS = {"limit": (0, float("inf"), ">= 0")}


class DataError(ValueError):
    """A user mistake in the inputs; main() prints it as one line."""


EXTS = (".jsonl", ".json", ".parquet")
HF_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


# ----------------------------------------------------------------------------- reading
def read_file(path):
    """One .jsonl / .json / .parquet file -> list of row dicts."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: malformed JSON ({e.msg})") from None
            return data if isinstance(data, list) else [data]
        rows = []
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        return rows


def read_source(source, split=""):
    """-> list of row dicts from a local file, a folder of files, or a Hugging Face dataset name."""
    if os.path.isfile(source):
        return read_file(source)
    if os.path.isdir(source):
        files = sorted(p for p in glob.glob(os.path.join(source, "**", "*"), recursive=True)
                       if p.endswith(EXTS) and (not split or re.match(rf"{re.escape(split)}[-.]", os.path.basename(p))))
        if not files:
            raise DataError(f"{source}: no {'/'.join(EXTS)} files" + (f" for split {split!r}"
                                                                      if split else ""))
        return [row for p in files for row in read_file(p)]
    if source.endswith(EXTS) or source.startswith((".", "/", "~")) or not HF_NAME.match(source):
        raise DataError(f"{source}: no such file or folder")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source} looks like a Hugging Face dataset name: reading it needs `pip install datasets`"
                        " (or download it and pass the local folder)") from None
    return list(datasets.load_dataset(source, split=split or "train"))


# ----------------------------------------------------------------------------- converting
def rating(c):
    """Sort key of an UltraFeedback completion: (overall_score, fine-grained_score); missing / NaN =
    lowest."""
    def num(v):
        try:
            v = float(v)
        except (TypeError, ValueError):
            return -math.inf
        return -math.inf if math.isnan(v) else v
    return num(c.get("overall_score")), num(c.get("fine-grained_score"))


def pick_gold(completions, gold_model, fallback):
    """The gold response among UltraFeedback completions (departure 1), or None."""
    usable = [c for c in completions if isinstance(c, dict) and isinstance(c.get("response"), str)
              and c["response"].strip()]
    named = [c for c in usable if gold_model and c.get("model") == gold_model]
    if named:
        return named[0]["response"]
    if fallback == "skip" or not usable:
        return None
    return max(usable, key=rating)["response"]  # max keeps the first of equal ratings


def last_assistant(messages):
    turns = [m.get("content") for m in messages or [] if isinstance(m, dict)
             and m.get("role") == "assistant"]
    return turns[-1] if turns and isinstance(turns[-1], str) else None


def convert_row(row, cfg):
    """One source row -> (id, prompt text, gold text or None). Unknown layouts are a DataError."""
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object per row, got {type(row).__name__}")
    if "completions" in row:  # openbmb/UltraFeedback
        text = row.get("instruction") or ""
        if not isinstance(text, str):
            raise DataError(f"'instruction' is a JSON {type(text).__name__}, not text")
        rid = "uf-" + hashlib.sha1(text.strip().encode()).hexdigest()[:16]
        return rid, text, pick_gold(row.get("completions") or [], cfg.gold_model, cfg.gold_fallback)
    if "chosen" in row or "messages" in row:  # HuggingFaceH4/ultrafeedback_binarized
        text = row.get("prompt") or ""
        if not isinstance(text, str):
            raise DataError(f"'prompt' is a JSON {type(text).__name__}, not text")
        rid = str(row.get("prompt_id")
                  or "uf-" + hashlib.sha1(text.strip().encode()).hexdigest()[:16])
        return rid, text, last_assistant(row.get("chosen") or row.get("messages"))
    raise DataError(f"unknown row layout with keys {sorted(row)[:6]}: expected 'instruction' + 'completions' "
                    "(openbmb/UltraFeedback) or 'prompt' + 'chosen' / 'messages' (ultrafeedback_binarized)")


def convert(rows, cfg):
    """Rows -> (records, counts): records {"id", "prompt": [user message], "gold"}; counts of kept
    and skipped."""
    if cfg.gold_fallback not in ("best", "skip"):
        raise DataError(f"--gold_fallback must be best or skip, got {cfg.gold_fallback!r}")
    out, seen, ids = [], set(), set()
    counts = {"rows": len(rows), "kept": 0, "empty_prompt": 0, "no_gold": 0, "duplicate": 0,
              "duplicate_id": 0}  # another prompt under an id already kept: train.py needs one
    for n, row in enumerate(rows, 1):
        try:
            rid, text, gold = convert_row(row, cfg)
        except DataError as e:
            raise DataError(f"row {n}: {e}") from None
        key = text.strip() if isinstance(text, str) else ""
        why = ("empty_prompt" if not key else "duplicate" if key in seen
               else "duplicate_id" if rid in ids
               else "no_gold" if not (isinstance(gold, str) and gold.strip()) else None)
        if why:
            counts[why] += 1
            continue
        seen.add(key)
        ids.add(rid)
        out.append({"id": rid, "prompt": [{"role": "user", "content": text}], "gold": gold})
    if cfg.limit > 0 and len(out) > cfg.limit:  # departure 3: a seeded subset, kept in source order
        keep = set(random.Random(cfg.seed).sample(range(len(out)), cfg.limit))
        out = [r for i, r in enumerate(out) if i in keep]
    counts["kept"] = len(out)
    return out, counts


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- demo and CLI
DEMO_ROWS = [
    {"source": "demo", "instruction": "Name a prime number between 10 and 20.", "completions": [
        {"model": "gpt-3.5-turbo", "response": "13 is prime.", "overall_score": 8.0, "fine-grained_score": 4.5},
        {"model": "gpt-4", "response": "11, 13, 17 and 19 are all prime; for example 13.", "overall_score": 7.5,
         "fine-grained_score": 4.75}]},
    {"source": "demo", "instruction": "Say hello in French.", "completions": [
        {"model": "llama-2-7b-chat", "response": "Hola!", "overall_score": 2.0, "fine-grained_score": 1.5},
        {"model": "wizardlm-13b", "response": "Bonjour !", "overall_score": 9.0, "fine-grained_score": 5.0}]},
    {"source": "demo", "instruction": "  ", "completions": [{"model": "gpt-4", "response": "?"}]},
    {"prompt": "Say hello in French.", "prompt_id": "dup", "chosen": [
        {"role": "user", "content": "Say hello in French."}, {"role": "assistant", "content": "Salut !"}]},
    {"prompt": "What is 2 + 2?", "prompt_id": "b1", "score_chosen": 9.0, "chosen": [
        {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]},
]


def main(argv=None):
    cfg = cli(Config, argv)
    try:
        check(cfg, CHOICES, LIMITS)  # every flag, before any file is read
        rows = read_source(cfg.source, cfg.split) if cfg.source else DEMO_ROWS
        records, counts = convert(rows, cfg)
        if not cfg.source:  # demo: print, write nothing
            for r in records:
                print(json.dumps(r, ensure_ascii=False))
        else:
            write_jsonl(cfg.out, records)
    except (ValueError, OSError) as e:  # user mistakes: one line
        sys.exit(f"error: {e}")
    print(" | ".join(f"{k} {v}" for k, v in counts.items()) + ("" if not cfg.source
                                                               else f" -> {cfg.out}"))


if __name__ == "__main__":
    main()

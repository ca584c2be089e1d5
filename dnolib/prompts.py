"""prompts.py: the prompts JSONL reader shared by sample.py and train.py (one row per line, checked).

    from dnolib.prompts import read_prompts
    rows = read_prompts("prompts.jsonl")    # [{"id", "line", "prompt", ...}, ...]
"""
import json
import os


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

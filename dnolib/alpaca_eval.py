"""dnolib/alpaca_eval.py: an iterate's answers to AlpacaEval 2's instructions, in AlpacaEval's
model_outputs format (the paper's headline metric is AlpacaEval 2's length-controlled win-rate).

    python evaluate.py --out runs/x --alpaca_eval alpaca_eval.json    # the best iterate's answers
    python evaluate.py --out runs/x --alpaca_eval alpaca_eval.json --iterate 0   # pi_1's
    alpaca_eval --model_outputs runs/x/alpaca_eval/iter_2.json --annotators_config ...

AlpacaEval's eval set is a JSON list of {"instruction", "output", "generator", "dataset"}; its
model_outputs file is the same list with the iterate's answer as "output" and its name as
"generator", in the eval set's order. Each instruction is sent as one user message, through the
model's chat template. docs/one_gpu.md, section 6, goes from a run folder to a win-rate.
"""
import json
import os

from dnolib.model_io import resolve_model
from dnolib.stages import read_json, write_atomic


def read_eval_set(path):
    """AlpacaEval's eval set -> its rows; anything but a JSON list of {"instruction": str, ...}
    is a one-line ValueError."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--alpaca_eval {path}: no such file") from None
    except ValueError as e:
        raise ValueError(f"--alpaca_eval {path}: not JSON ({str(e).splitlines()[0]})") from None
    if not (isinstance(rows, list) and rows and all(
            isinstance(r, dict) and isinstance(r.get("instruction"), str) for r in rows)):
        raise ValueError(f"--alpaca_eval {path}: want a JSON list of {{\"instruction\": str, ...}}"
                         " (AlpacaEval's alpaca_eval.json)")
    return rows


def pick_iterate(out, t):
    """The iterate to export: t >= 0 as given (0: pi_1), -1: the best iterate (OUT/best.json,
    Alg. 2, line 9). -> (t, its model folder); a missing one is a one-line error."""
    if t < 0:
        best = os.path.join(out, "best.json")
        if not os.path.exists(best):
            raise FileNotFoundError(f"{out}: no best.json yet (python train.py --out {out} "
                                    "first, or pass --iterate t)")
        t = read_json(best)["iter"]
    if t == 0:
        model = read_json(os.path.join(out, "config.json")).get("model")
        return 0, resolve_model(model) if model else os.path.join(out, "demo", "init")
    folder = os.path.join(out, f"iter_{t}", "checkpoint")
    if not os.path.exists(os.path.join(folder, "done")):
        raise FileNotFoundError(f"{out}: iteration {t} has no finished checkpoint ({folder})")
    return t, folder


def model_outputs(rows, outs, generator):
    """Eval-set rows and one sample each (sample.generate's output) -> AlpacaEval's model_outputs:
    [{"instruction", "output", "generator", "dataset"?}] in the rows' order."""
    got = []
    for r, o in zip(rows, outs):
        item = {"instruction": r["instruction"], "output": o[0]["text"], "generator": generator}
        if r.get("dataset") is not None:
            item["dataset"] = r["dataset"]
        got.append(item)
    return got


def write(path, items):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, json.dumps(items, indent=1, ensure_ascii=False))

"""cli.py: command-line flags generated from a script's one flat @dataclass Config, so each default lives in one place.

    from cli import cli
    cfg = cli(Config)                 # --name VALUE for every field; --help shows each field's trailing comment
    cfg = cli(Config, ["--lr", "1e-5"])
    check(cfg, choices={"schedule": ("cosine", "linear")}, limits={"lr": (1e-300, math.inf, "finite and > 0")})
"""
import argparse
import inspect
import math
import re
import sys
from dataclasses import fields


def _bool(s):
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _helps(cls):
    """field name -> the trailing '# comment' on its line in the class source (the flag's help text)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):  # e.g. a class defined in an interactive session
        return {}
    return dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*?)\s*$", src, re.M))


def cli(cls, argv=None):
    """Parse argv (default: sys.argv[1:]) into cls(...): one --flag per dataclass field, typed like its default."""
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0]
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = _helps(cls)
    for f in fields(cls):
        typ = _bool if f.type in (bool, "bool") else str if f.default is None else type(f.default)
        p.add_argument(f"--{f.name}", type=typ, default=f.default, help=helps.get(f.name, " ").replace("%", "%%"))
    p.error = lambda msg: sys.exit(f"error: {msg} (see --help)")   # a bad flag: one line, no usage dump
    return cls(**vars(p.parse_args(argv)))


def check(cfg, choices=None, limits=None):
    """Flag values against choices {name: allowed values} and limits {name: (lowest, highest, in words)}, every number
    also finite: a one-line ValueError naming the first bad flag (scripts call it before any expensive work)."""
    for name, ok in (choices or {}).items():
        if getattr(cfg, name) not in ok:
            raise ValueError(f"--{name} must be one of {', '.join(map(str, ok))}; got {getattr(cfg, name)!r}")
    for name, (lo, hi, words) in (limits or {}).items():
        if not (math.isfinite(getattr(cfg, name)) and lo <= getattr(cfg, name) <= hi):
            raise ValueError(f"--{name} must be {words}; got {getattr(cfg, name)}")


if __name__ == "__main__":
    from dataclasses import dataclass

    @dataclass
    class Config:
        lr: float = 1e-4      # learning rate
        steps: int = 10       # optimizer steps
        compile: bool = False  # torch.compile the model
    print(cli(Config))

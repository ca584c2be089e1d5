"""cli.py: command-line flags generated from a script's one flat @dataclass Config, so each default
lives in one place.

    from dnolib.cli import cli
    cfg = cli(Config)                 # --name VALUE for every field; --help shows each field's trailing comment
    cfg = cli(Config, ["--lr", "1e-5"])
    print(show(cfg))                  # lr = 1e-05     steps = 10     compile = False
    check(cfg, choices={"schedule": ("cosine", "linear")}, limits={"lr": (1e-300, math.inf, "finite
    and > 0")})

    if __name__ == "__main__":        # at the top of a script, before its heavy imports (torch: 2-8 s):
        early_help(__file__)          # -h/--help printed from the script's Config source, then exit
"""
import argparse
import ast
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


def _helps(src):
    """field name -> the trailing '# comment' on its line in a class's source (the flag's help
    text)."""
    return dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*?)\s*$", src, re.M))


def _parser(doc, flags, helps):
    """argparse for flags [(name, default)]: typed like the default (bool: true/false), help from
    helps."""
    p = argparse.ArgumentParser(description=doc.strip().split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, default in flags:
        typ = _bool if isinstance(default, bool) else str if default is None else type(default)
        p.add_argument(f"--{name}", type=typ, default=default,
                       help=helps.get(name, " ").replace("%", "%%"))
    # a bad flag: one line, no usage dump
    p.error = lambda msg: sys.exit(f"error: {msg} (see --help)")
    return p


def cli(cls, argv=None):
    """Parse argv (default: sys.argv[1:]) into cls(...): one --flag per dataclass field, typed like
    its default."""
    try:
        helps = _helps(inspect.getsource(cls))
    except (OSError, TypeError):  # e.g. a class defined in an interactive session
        helps = {}
    p = _parser(sys.modules[cls.__module__].__doc__ or "",
                [(f.name, f.default) for f in fields(cls)], helps)
    return cls(**vars(p.parse_args(argv)))


def early_help(file, argv=None):
    """-h/--help of the script `file`, printed from its source (the docstring's first line and class
    Config's fields, read with ast) before the script imports torch, then exit; any other argv:
    return and go on. The same parser as cli() prints it, so both helps are identical."""
    if not {"-h", "--help"} & set(sys.argv[1:] if argv is None else argv):
        return
    with open(file) as f:
        src = f.read()
    tree = ast.parse(src)
    config = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config")
    flags = [(n.target.id, ast.literal_eval(n.value)) for n in config.body
             if isinstance(n, ast.AnnAssign)]
    # whole lines: trailing comments
    lines = "\n".join(src.splitlines()[config.lineno - 1:config.end_lineno])
    _parser(ast.get_docstring(tree) or "", flags, _helps(lines)).print_help()
    sys.exit(0)


def show(cfg, width=110) -> str:
    """A config as an aligned block of `name = value` cells, as many per line as fit in width."""
    cells = [f"{k} = {v!r}" for k, v in vars(cfg).items()]
    w = max(map(len, cells)) + 2
    per = max(1, width // w)
    return "\n".join("".join(c.ljust(w) for c in cells[i:i + per]).rstrip()
                     for i in range(0, len(cells), per))


def check(cfg, choices=None, limits=None):
    """Flag values against choices {name: allowed values} and limits {name: (lowest, highest, in
    words)}, every number also finite: a one-line ValueError naming the first bad flag (scripts call
    it before any expensive work)."""
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
    early_help(__file__)
    print(show(cli(Config)))

"""cli.py: flags from a Config, --help answered from the source before torch is imported, the config block."""
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from dnolib import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "dno.py", "experiments/tabular.py", "demo/task.py",
                                    "demo/sft.py", "data/ultrafeedback/prepare.py", "sample.py", "oracle.py",
                                    "experiments/compare_bt.py"])
def test_early_help_matches_the_full_help_and_imports_no_torch(script, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setattr(sys, "argv", [script])                  # argparse names the program after argv[0]
    name = os.path.basename(script)
    path = os.path.join(ROOT, script)
    with pytest.raises(SystemExit) as e:
        cli.early_help(path, ["--out", "x", "-h"])
    assert e.value.code == 0
    early = capsys.readouterr().out
    code = ("import atexit, runpy, sys; atexit.register(lambda: print('torch loaded:', 'torch' in sys.modules)); "
            f"sys.argv = [{name!r}, '--help']; runpy.run_path({path!r}, run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, COLUMNS="120", PYTHONPATH=ROOT))
    assert run.returncode == 0, run.stderr
    assert run.stdout.endswith("torch loaded: False\n")           # answered before the heavy imports
    assert run.stdout[:-len("torch loaded: False\n")] == early    # the same text as the parser of cli() prints
    assert early.startswith(f"usage: {name} [-h]")
    if script == "train.py":
        assert "--threads THREADS" in early and "CPU threads: auto" in early   # a field's trailing comment ...
        assert "seconds to sleep inside each stage" in early                    # ... the last field's too


def test_early_help_returns_without_help_and_help_equals_cli(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    assert cli.early_help(os.path.join(ROOT, "train.py"), ["--out", "x"]) is None
    import train
    with pytest.raises(SystemExit):
        cli.cli(train.Config, ["--help"])
    full = capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.early_help(os.path.join(ROOT, "train.py"), ["--help"])
    assert capsys.readouterr().out.split("\n", 1)[1] == full.split("\n", 1)[1]   # same help (program name aside)


def test_show_is_an_aligned_block_of_every_field():
    @dataclass
    class Config:
        lr: float = 1e-4      # learning rate
        name: str = "a b"     # a name
        steps: int = 10       # steps
    block = cli.show(Config(), width=40)
    assert block.splitlines() == ["lr = 0.0001   name = 'a b'", "steps = 10"]
    assert cli.show(cli.cli(Config, ["--steps", "3"]), width=200) == "lr = 0.0001   name = 'a b'  steps = 3"

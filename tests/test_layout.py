"""The house: the paper's concepts at the top (at most 8 files), the machinery in dnolib/, which never
imports a top-level file."""
import ast
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def top_level_imports(pkg):
    """[(file:line, module)] for every import in pkg that names a top-level .py file of the repo."""
    top = {p.stem for p in ROOT.glob("*.py")}
    bad = []
    for p in (ROOT / pkg).rglob("*.py"):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Import):
                names = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                names = [n.module]
            else:
                continue
            bad += [(f"{p.relative_to(ROOT)}:{n.lineno}", m) for m in names if m.split(".")[0] in top]
    return bad


def test_the_package_never_imports_the_top_level():
    assert top_level_imports("dnolib") == []


def test_the_check_sees_an_import_of_the_top(tmp_path, monkeypatch):
    bad = ROOT / "dnolib" / "_layout_probe.py"
    bad.write_text("import dno\n")
    try:
        assert top_level_imports("dnolib") == [("dnolib/_layout_probe.py:1", "dno")]
    finally:
        os.remove(bad)


def test_a_handful_of_concept_files_on_top():
    names = sorted(p.name for p in ROOT.glob("*.py"))
    assert names == ["dno.py", "evaluate.py", "iteration.py", "oracle.py", "sample.py", "train.py"]


def paper_map_names(text):
    """docs/paper.md's line-to-code table -> [(file, function)] for every `file.py: name` it cites."""
    import re
    i = text.index("## Where each line lives in this repo")
    return re.findall(r"`([\w/]+\.py): (\w+)`", text[i:])


def unresolved(names):
    """The (file, name) pairs whose file does not exist or does not define name at its top level."""
    bad = []
    for file, name in names:
        path = ROOT / file
        if not path.is_file():
            bad.append((file, name))
            continue
        tree = ast.parse(path.read_text())
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                    if isinstance(t, ast.Name)}
        if name not in defined:
            bad.append((file, name))
    return bad


def test_the_paper_map_names_what_exists():
    names = paper_map_names((ROOT / "docs" / "paper.md").read_text())
    assert len(names) >= 20 and unresolved(names) == []
    assert unresolved([("iteration.py", "no_such_step"), ("nowhere.py", "main")]) == [
        ("iteration.py", "no_such_step"), ("nowhere.py", "main")]

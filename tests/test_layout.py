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
    j = text.find("\n## ", i + 1)
    return re.findall(r"`([\w/]+\.py): (\w+)`", text[i:j if j > 0 else None])


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


def departures_in(path):
    """The numbers of a file's docstring list "Departures from the paper", in order."""
    import re
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    i = doc.find("Departures from the paper")
    if i < 0:
        return []
    return [int(n) for n in re.findall(r"^\s*(\d+)\. ", doc[i:], re.M)]


def departures_table(text):
    """docs/paper.md's departures table -> {file: [numbers]}, in the table's order."""
    import re
    i = text.index("## Where the code departs from the paper")
    table = {}
    for file, n in re.findall(r"^\| ([\w/]+\.py) \| (\d+) \|", text[i:], re.M):
        table.setdefault(file, []).append(int(n))
    return table


def test_the_departures_table_gathers_every_list():
    table = departures_table((ROOT / "docs" / "paper.md").read_text())
    files = [p for p in ROOT.glob("**/*.py") if ".venv" not in p.parts and "tests" not in p.parts
             and "bench" not in p.parts and departures_in(p)]
    lists = {str(p.relative_to(ROOT)): departures_in(p) for p in files}
    assert {"train.py", "iteration.py", "dno.py", "oracle.py", "sample.py", "evaluate.py"} <= set(lists)
    for file, numbers in lists.items():
        assert numbers == list(range(1, len(numbers) + 1)), f"{file}: its list is not 1..n"
    assert table == lists


def test_the_departures_check_sees_a_missing_row(tmp_path):
    text = (ROOT / "docs" / "paper.md").read_text()
    table = departures_table(text.replace("| sample.py | 3 |", "| nowhere |"))
    assert table["sample.py"] == [1, 2] != departures_in(ROOT / "sample.py")

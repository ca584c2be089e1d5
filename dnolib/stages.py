"""stages.py: the run folder of train.py -- atomic stages, manifests that name their inputs and
flags, verified resume, one run per folder.

    python stages.py             # demo: commit a stage, resume it, change a flag, see the refusal

A stage is a folder OUT/iter_t/<name>/ written as <name>.tmp, `done` last, then renamed: it exists
whole or not at all, so kill -9 anywhere loses at most the stage in progress. Its manifest.json
holds the full config and its "shape": the sha256 of every input it read (files, folders, or the
records themselves) and the value of every flag that shaped it (iteration.STAGES declares both).
On resume a finished stage is reused only when its shape matches the current one; otherwise the
run stops with one line naming the stage and the flag (or input) that differs -- a flag the
manifest does not record counts as different -- and a way out that works as printed: the old
value, or --rollback t (redo iteration t and later).

Hashes read every byte, streamed in 8 MB blocks: a 1 GB file costs 1.3 CPU-seconds (1.9 s wall on
the loaded dev machine, hashlib.sha256), about what reading it costs. Within one process a file is
read once per (device, inode, size, mtime): a checkpoint that several stages read is hashed once
per run; a resume is a new process, so it reads every byte again.

OUT/lock is held with fcntl.flock for the life of the run: the kernel releases it when the process
ends, however it ends (kill -9 included), so no pid is trusted and no stale lock can exist. A
second run is refused at once. flock over a network file system may not reach other hosts: run
one host per folder there.
"""
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import socket
import time
from dataclasses import asdict


class StageError(ValueError):
    """A run-folder problem in one line (a changed flag on resume, a locked folder, a bad file)."""


# ------------------------------------------------------------------------ files
def read_jsonl(path):
    """JSONL -> list of dicts; a corrupt line is a one-line StageError naming path:line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
                if not isinstance(rows[-1], dict):
                    raise ValueError(f"a JSON {type(rows[-1]).__name__}, not an object")
            except ValueError as e:
                folder = os.path.dirname(os.path.abspath(path))
                raise StageError(f"{path}:{n}: corrupt JSON line ({e}); delete {folder} to redo "
                                 "it") from None
    return rows


def read_json(path):
    """A JSON object (every file of ours is one); anything else is a one-line StageError."""
    try:
        with open(path, encoding="utf-8") as f:
            got = json.load(f)
        if not isinstance(got, dict):
            raise ValueError(f"a JSON {type(got).__name__}, not an object")
        return got
    except ValueError as e:
        folder = os.path.dirname(os.path.abspath(path))
        raise StageError(f"{path}: corrupt JSON ({e}); delete {folder} to redo it") from None


def pinned(path, make):
    """The value kept at path (JSON), or make()'s, kept there first: a choice that depends on the
    moment (free memory) and that a rerun must repeat."""
    if os.path.exists(path):
        return read_json(path)["value"]
    value = make()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, json.dumps({"value": value}))
    return value


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


_SEEN = {}   # (device, inode, size, mtime_ns) -> sha256 of the file's bytes, in this process


def file_sha(path):
    """sha256 of every byte of one file, streamed in 8 MB blocks (memoized per stat)."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _SEEN:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
        _SEEN[key] = h.hexdigest()
    return _SEEN[key]


def sha(x):
    """sha256 (16 hex) of a file, of a folder's files (names and bytes; not manifest.json or done),
    or of any JSON-able value (the records a stage read, e.g. a prompt slice)."""
    h = hashlib.sha256()
    if not isinstance(x, (str, os.PathLike)) or not os.path.exists(x):
        h.update(json.dumps(x, sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]
    paths = [x]
    if not os.path.isfile(x):
        skip = ("manifest.json", "done")
        paths = sorted(os.path.join(d, n) for d, _, ns in os.walk(x) for n in ns
                       if n not in skip)
    for p in paths:
        h.update(os.path.relpath(p, x).encode())
        h.update(file_sha(p).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------ stages
def stage_dir(out, t, name, file=None):
    """OUT/iter_t/<name>[/file]."""
    path = os.path.join(out, f"iter_{t}", name)
    if file:
        return os.path.join(path, file)
    return path


def shape(inputs, flags):
    """What a stage depends on: {"inputs": {name: sha}, "flags": {name: value}}."""
    return {"inputs": {k: sha(v) for k, v in inputs.items()}, "flags": dict(flags)}


def is_done(out, t, name, want, added=None):
    """True if OUT/iter_t/<name> is finished and was made from `want` (a shape); False if it is not
    finished. A finished stage made from other inputs or flags (or whose manifest lacks a flag) is a
    StageError naming what differs, with a way out that works as printed. added: {flag: value}
    for flags newer than some manifests, each with the value that does what the code did before
    the flag existed; a manifest without one of them was made with that value."""
    path = stage_dir(out, t, name)
    if not os.path.exists(os.path.join(path, "done")):
        return False
    where, redo = f"iter_{t}/{name}", f"--rollback {t} to redo iteration {t} and later"
    file = os.path.join(path, "manifest.json")
    try:
        manifest = json.load(open(file, encoding="utf-8"))
    except ValueError as e:
        raise StageError(f"{file}: corrupt JSON ({e}); rerun with {redo}") from None
    got = manifest.get("shape", {})
    flags, inputs = {**(added or {}), **got.get("flags", {})}, got.get("inputs", {})
    for k, v in want["flags"].items():
        if k not in flags:
            raise StageError(f"{where} records no --{k} (an older train.py made it): rerun "
                             f"with {redo}")
        if flags[k] != v:
            old = shlex.quote(str(flags[k]))
            new = shlex.quote(str(v))
            raise StageError(f"{where} was made with --{k} {old}, not {new}: rerun with "
                             f"--{k} {old}, or with {redo}")
    for k, v in want["inputs"].items():
        if inputs.get(k) != v:
            raise StageError(f"{where}: its input '{k}' changed since it was made: rerun "
                             f"with {redo}")
    if manifest.get("outputs") != sha(path):
        raise StageError(f"{where}: its files changed since it was made: rerun with {redo}")
    return True


def start(out, t, name):
    """An empty OUT/iter_t/<name>.tmp for the stage's files (leftovers cleared) -> its path."""
    tmp = stage_dir(out, t, name) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit(out, t, name, files, manifest, config, pause=0.0):
    """Finish a stage begun with start(): files + manifest into its .tmp folder, `done` last, then
    one os.replace. files: {name: rows (.jsonl) or a JSON value}; the .tmp folder may already hold
    more (a checkpoint)."""
    path = stage_dir(out, t, name)
    tmp = path + ".tmp"
    for fname, rows in files.items():
        with open(os.path.join(tmp, fname), "w") as f:
            if fname.endswith(".jsonl"):
                f.writelines(json.dumps(r) + "\n" for r in rows)
            else:
                json.dump(rows, f)
    record = {"config": asdict(config), "stage": name, "iter": t, **manifest,
              "outputs": sha(tmp)}
    with open(os.path.join(tmp, "manifest.json"), "w") as f:    # outputs: what is_done re-checks
        json.dump(record, f, indent=1)
    time.sleep(pause)                                   # test hook: a kill lands inside the stage
    open(os.path.join(tmp, "done"), "w").close()
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def rollback(out, t):
    """Discard the folders of iterations >= t (t = -1: keep all); the judge cache keeps answers."""
    if t < 0:
        return
    for name in sorted(os.listdir(out)):
        if name.startswith("iter_") and name[5:].isdigit() and int(name[5:]) >= t:
            print(f"rollback: removing {name}", flush=True)
            shutil.rmtree(os.path.join(out, name))


# ------------------------------------------------------------------------ one run per folder
_HELD = {}   # absolute OUT -> the open file descriptor holding OUT/lock in this process


def lock(out):
    """Hold OUT/lock (fcntl.flock) until unlock(out) or the end of the process; another holder:
    StageError at once."""
    path = os.path.join(out, "lock")
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 256).decode(errors="replace")
            os.close(fd)
            pid = "?"                                   # the owner may not have written it yet
            if owner.startswith("{") and owner.endswith("}"):
                pid = json.loads(owner).get("pid")
            raise StageError(f"{out} is in use by another run (pid {pid}); wait for it to finish "
                             "or stop it, or choose another --out") from None
        if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
            break                                       # not a file a finishing run just removed
        os.close(fd)
    else:
        raise StageError(f"cannot take {path}")
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    _HELD[os.path.abspath(out)] = fd
    return path


def unlock(out):
    """Release OUT/lock if this process holds it (removed while still held, then closed)."""
    fd = _HELD.pop(os.path.abspath(out), None)
    if fd is not None:
        os.remove(os.path.join(out, "lock"))
        os.close(fd)


if __name__ == "__main__":
    import tempfile
    from dataclasses import dataclass

    @dataclass
    class Demo:
        k: int = 5

    with tempfile.TemporaryDirectory() as d:
        lock(d)
        want = shape({"prompts": [{"id": "a"}]}, {"k": 5})
        os.makedirs(os.path.join(d, "iter_1"))
        print("done before commit:", is_done(d, 1, "samples", want))
        start(d, 1, "samples")
        files = {"samples.jsonl": [{"id": "a", "samples": ["x"]}]}
        commit(d, 1, "samples", files, {"shape": want}, Demo())
        print("done after commit:", is_done(d, 1, "samples", want))
        try:
            is_done(d, 1, "samples", shape({"prompts": [{"id": "a"}]}, {"k": 3}))
        except StageError as e:
            print("resume with --k 3:", e)
        unlock(d)

"""stages.py: the run folder of train.py -- atomic stages, manifests that name their inputs, verified resume, one run
per folder -- and the process plumbing that torchrun needs (device and process group, rank, print0, barrier,
on_rank0, gather, FSDP2 wrapping and the full state dict).

    python stages.py                       # demo: commit a stage, resume it, change a flag, see the one-line refusal

A stage is a folder OUT/iter_t/<name>/ written as <name>.tmp, `done` last, then renamed: it exists whole or not at
all, so kill -9 anywhere loses at most the stage in progress. Its manifest.json holds the full config and its
"shape": the sha256 of every input it read (files, folders, or the records themselves) and the flags that shaped
it. On resume a finished stage is reused only when its shape matches the current one; otherwise the run stops with
one line naming the stage and the flag (or input) that differs, and suggests --rollback. Records are always joined
by id, never by position. OUT/lock holds the pid of the run that owns the folder; a second run is refused at once,
and a lock left by a killed run (its pid gone) is taken over with a warning.

Departures from the paper: none (the paper describes no run folder).
"""
import atexit
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist


class StageError(ValueError):
    """A run-folder problem with a one-line message (a changed flag on resume, a locked folder, a corrupt file)."""


# ----------------------------------------------------------------------------- processes
def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def print0(*a):
    if rank() == 0:
        print(*a, flush=True)


def barrier():
    if world() > 1:
        dist.barrier()


def on_rank0(fn, *args):
    """Run fn on rank 0 only (judging, writing); a user-facing error there stops every rank with one line."""
    err = None
    if rank() == 0:
        try:
            fn(*args)
        except (ValueError, OSError, RuntimeError) as e:
            if world() == 1:
                raise
            err = str(e)
    if world() > 1:
        box = [err]
        dist.broadcast_object_list(box, src=0)
        if box[0]:
            raise SystemExit(f"error: {box[0]}")


def setup(device_name):
    """-> torch.device; under torchrun (WORLD_SIZE > 1) also the process group: nccl on GPU, gloo on CPU."""
    from datetime import timedelta
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=12))  # rank 0 judges for long
    return device


def gather(items):
    """Concatenate every rank's list (in rank order); a no-op in one process."""
    if world() == 1:
        return items
    parts = [None] * world()
    dist.all_gather_object(parts, items)
    return [x for p in parts for x in p]


def sum_over_ranks(x, device):
    """x summed over every rank (through the device: nccl reduces device tensors only); x itself in one process."""
    if world() == 1:
        return x
    x = x.to(device)
    dist.all_reduce(x)
    return x.cpu()


def for_training(model, grad_ckpt=False, bf16=False):
    """Activation checkpointing per block (optional), then under torchrun FSDP2: each block, then the root; with bf16
    the sharded fp32 parameters are all-gathered and computed in bf16, gradients reduced in fp32. Parameter names
    are unchanged, so the state dict saves as is."""
    model.train()
    if grad_ckpt:
        from torch.distributed._composable import checkpoint
        for block in model.layers:
            checkpoint(block)
    if world() > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
            MixedPrecisionPolicy()
        for block in model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model


def full_state_dict(model):
    """Under torchrun: the full (unsharded) state dict gathered on CPU (every rank must call it); else None."""
    if world() == 1:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ----------------------------------------------------------------------------- files
def read_jsonl(path):
    """JSONL -> list of dicts; a corrupt line is a one-line StageError naming path:line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise StageError(f"{path}:{n}: corrupt JSON line ({e}); delete the stage folder to redo it")
    return rows


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise StageError(f"{path}: corrupt JSON ({e}); delete the stage folder to redo it") from None


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def sha(x):
    """sha256 (16 hex) of a file, a folder's files (by name; files > 64 MB count by name and size), or of any
    JSON-able value (the records a stage read, e.g. a prompt slice)."""
    h = hashlib.sha256()
    if not isinstance(x, (str, os.PathLike)) or not os.path.exists(x):
        h.update(json.dumps(x, sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]
    paths = [x] if os.path.isfile(x) else sorted(
        os.path.join(d, n) for d, _, ns in os.walk(x) for n in ns if n not in ("manifest.json", "done"))
    for p in paths:
        h.update(os.path.relpath(p, x).encode())
        size = os.path.getsize(p)
        if size > 64 << 20:
            h.update(str(size).encode())
        else:
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- stages
def shape(inputs, flags):
    """What a stage depends on: {"inputs": {name: sha}, "flags": {name: value}}."""
    return {"inputs": {k: sha(v) for k, v in inputs.items()}, "flags": dict(flags)}


def is_done(path, want):
    """True if the stage at path is finished and was made from `want` (a shape); False if it is not finished.
    A finished stage made from other inputs or flags is a StageError naming what differs."""
    if not os.path.exists(os.path.join(path, "done")):
        return False
    manifest = read_json(os.path.join(path, "manifest.json"))
    got = manifest.get("shape", {})
    where = os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))
    hint = f"rerun with the old value, or --rollback {max(0, int(where.split('/')[0][5:]) - 1)} to redo from there"
    for k, v in want["flags"].items():
        if got.get("flags", {}).get(k, v) != v:
            raise StageError(f"{where} was made with --{k} {got['flags'][k]}, not {v}: {hint}")
    for k, v in want["inputs"].items():
        if got.get("inputs", {}).get(k, v) != v:
            raise StageError(f"{where}: its input '{k}' changed since it was made: {hint}")
    if manifest.get("outputs") not in (None, sha(path)):
        raise StageError(f"{where}: its files changed since it was made; delete {path} to redo the stage")
    return True


def rollback(out, t):
    """Discard the folders of iterations > t (t = -1: keep all); the judge cache keeps their answers."""
    for name in sorted(os.listdir(out)) if t >= 0 else []:
        if name.startswith("iter_") and name[5:].isdigit() and int(name[5:]) > t:
            print0(f"rollback: removing {name}")
            shutil.rmtree(os.path.join(out, name))


def commit(path, files, manifest, config, save=None, pause=0.0):
    """Write a stage atomically: files + manifest into PATH.tmp, `done` last, then one os.replace.
    files: {name: rows (.jsonl) or a JSON value}; save(tmp_dir): e.g. the HF checkpoint."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if save:
        save(tmp)
    for name, rows in files.items():
        with open(os.path.join(tmp, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows) if name.endswith(".jsonl") else json.dump(rows, f)
    with open(os.path.join(tmp, "manifest.json"), "w") as f:                # outputs: what is_done re-checks
        json.dump({"config": asdict(config), **manifest, "outputs": sha(tmp)}, f, indent=1)
    time.sleep(pause)                                           # test hook: a kill lands inside the stage
    open(os.path.join(tmp, "done"), "w").close()
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- one run per folder
def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock(out):
    """Take OUT/lock for this process (released by unlock or at exit). A live owner: StageError at once; a lock
    left by a run that is gone (kill -9): taken over with a warning."""
    path, me = os.path.join(out, "lock"), {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = read_json(path)
            except (OSError, StageError):
                owner = {}                                      # torn by a kill while being written: stale
            pid, host = owner.get("pid"), owner.get("host")
            if host not in (None, me["host"]):
                raise StageError(f"{out} is locked by a run on host {host} (pid {pid}); if that run is gone, "
                                 f"delete {path}")
            if isinstance(pid, int) and pid != me["pid"] and _alive(pid):
                raise StageError(f"{out} is in use by another run (pid {pid}); wait for it to finish or stop it, "
                                 "or choose another --out")
            if pid != me["pid"]:
                print(f"warning: {path} was left by a run that is gone (pid {pid}); taking it over", file=sys.stderr)
            os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(unlock, out)
        return path
    raise StageError(f"cannot take {path}")


def finish(out):
    """At the end of a run, or on its error: release OUT/lock and, under torchrun, the process group."""
    unlock(out)
    if dist.is_initialized():
        dist.destroy_process_group()


def unlock(out):
    """Remove OUT/lock if this process holds it."""
    path = os.path.join(out, "lock")
    try:
        if read_json(path).get("pid") == os.getpid():
            os.remove(path)
    except (OSError, StageError):
        pass


if __name__ == "__main__":
    import tempfile
    from dataclasses import dataclass

    @dataclass
    class Demo:
        k: int = 5

    with tempfile.TemporaryDirectory() as d:
        lock(d)
        stage, want = os.path.join(d, "iter_1", "samples"), shape({"prompts": [{"id": "a"}]}, {"k": 5})
        os.makedirs(os.path.dirname(stage))
        print("done before commit:", is_done(stage, want))
        commit(stage, {"samples.jsonl": [{"id": "a", "samples": ["x"]}]}, {"shape": want}, Demo())
        print("done after commit:", is_done(stage, want))
        try:
            is_done(stage, shape({"prompts": [{"id": "a"}]}, {"k": 3}))
        except StageError as e:
            print("resume with --k 3:", e)

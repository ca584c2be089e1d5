"""dnolib/tracking.py: --report_to none | tensorboard | wandb, behind one interface, so the loop
never branches on which (or on whether the package is installed).

    tracker = open_tracker("tensorboard", "runs/x", vars(cfg))   # the run config, at the start
    tracker.log("train", {"loss": 0.69, "lr": 4e-5}, step=12)    # -> train/loss, train/lr at 12
    log_steps(tracker, "runs/x", t, log)         # iteration t's step log (iteration.train_pi)
    log_metrics(tracker, "runs/x", t)            # metrics.jsonl's row t and the mixture's
    tracker.close()

The loop calls it at its reporting points only (train.prepare, iteration.train_pi once pi_{t+1} is
trained, iteration.eval_step once the report is written): what reaches the tracker is what the run
already writes, the step log of OUT/iter_t/checkpoint/train_log.jsonl and every number of
OUT/metrics.jsonl (nested dicts flattened: preferences/cycle_share, provenance/sample>gold, ...).

TensorBoard: event files under OUT/tensorboard/ (torch.utils.tensorboard, which needs the
tensorboard package); the config as a text summary. W&B: wandb.init(project="dno", dir=OUT,
config=...); `WANDB_MODE=offline` keeps it off the network (`wandb sync OUT/wandb/offline-run-*`
uploads it later). Each prefix has its own step axis ("train": optimizer steps counted over the
whole run, "eval": the iteration t). A missing package is one line and a no-op tracker: the run
goes on. Only rank 0 logs.
"""
import json
import os

from dnolib.stages import read_json, read_jsonl, stage_dir


class NullTracker:
    """The no-op stand-in: --report_to none, another rank, or a package that is not installed."""

    def log(self, prefix, metrics, step):
        pass

    def close(self):
        pass


class TensorBoardTracker:
    def __init__(self, out, config):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(out, "tensorboard"), flush_secs=10)
        text = json.dumps(config, indent=1, default=str)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "))   # as code

    def log(self, prefix, metrics, step):
        for k, v in numbers(metrics).items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbTracker:
    def __init__(self, out, config):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dno"), dir=out,
                              config=config, name=os.path.basename(os.path.abspath(out)))
        self.axes = set()

    def log(self, prefix, metrics, step):
        if prefix not in self.axes:                     # each prefix plots against its own step
            self.run.define_metric(f"{prefix}/step")
            self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
            self.axes.add(prefix)
        row = {f"{prefix}/{k}": v for k, v in numbers(metrics).items()}
        self.run.log({**row, f"{prefix}/step": step})

    def close(self):
        self.run.finish()


TRACKERS = {"tensorboard": (TensorBoardTracker, "tensorboard"), "wandb": (WandbTracker, "wandb")}


def numbers(metrics, prefix=""):
    """The numbers of a dict, nested dicts flattened to "outer/inner" (None, text, lists and
    booleans are left out)."""
    got = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            got.update(numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            got[prefix + k] = float(v)
    return got


def log_steps(tracker, out, t, log):
    """Iteration t's step log (iteration.optimize's rows) as "train" at run-wide step numbers:
    after the steps of iterations 1..t-1, as their checkpoint manifests count them."""
    if isinstance(tracker, NullTracker):
        return
    before = 0
    for u in range(1, t):
        manifest = stage_dir(out, u, "checkpoint", "manifest.json")
        if os.path.exists(manifest):
            before += read_json(manifest)["counts"]["steps"]
    for row in log:
        tracker.log("train", {**row, "iter": t}, before + row["step"])


def log_metrics(tracker, out, t):
    """OUT/metrics.jsonl's row of iterate t as "eval" at step t, and the mixture's row as "mix"
    (at step t: the mixture of iterates 0..t)."""
    path = os.path.join(out, "metrics.jsonl")
    if isinstance(tracker, NullTracker) or not os.path.exists(path):
        return
    for row in read_jsonl(path):
        if row["iter"] == t or row["iter"] == "mix":
            tracker.log("eval" if row["iter"] == t else "mix", row, t)


def open_tracker(kind, out, config, log=print):
    """--report_to `kind` for the run folder `out`, with the run config logged at the start. A
    package that is not installed (or fails to start) is one line through `log`, and the no-op
    tracker."""
    if kind == "none":
        return NullTracker()
    cls, package = TRACKERS[kind]
    try:
        return cls(out, config)
    except ImportError:
        log(f"--report_to {kind}: {package} is not installed (pip install {package}); "
            "the run goes on without it")
    except Exception as e:                              # e.g. wandb with no login and no network
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        log(f"--report_to {kind}: could not start ({why}); the run goes on without it")
    return NullTracker()

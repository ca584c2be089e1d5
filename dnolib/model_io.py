"""Model folders, hub ids and tokenizers with one-line load errors: everything model.py needs from
outside the network, except memory and thread budgets (budget.py).

    python model_io.py                                # a tiny folder written and read back
    from dnolib.model_io import resolve_model, load_tokenizer, read_config
    path = resolve_model("Qwen/Qwen2.5-0.5B-Instruct")  # a local folder as is, or a hub id -> its cached snapshot
    tok = load_tokenizer(path)                        # AutoTokenizer, trust_remote_code=False, one-line errors

What lives here: reading and writing a Hugging Face folder (config.json, safetensors shards renamed
by HF_PREFIX, generation_config.json, tokenizer), resolving an id ORG/NAME the way transformers does
(HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE), and ModelError, the one-line error budget.py raises too.
model.py (the network) imports from here; train.py, sample.py and judging.py's local judge load
tokenizers and folders through these; this file never imports model.py.

User mistakes are one-line `ModelError`s (a ValueError) naming the file: config.json that is not
JSON or not an object; weights garbage, truncated or unreadable; a hub id that is neither cached nor
downloadable. Nothing here runs code shipped with a model.

Notes (where loading differs from transformers' own):
 1. A config.json or tokenizer_config.json with "auto_map" (custom model code) is refused, and
    transformers is always called with trust_remote_code=False; hub downloads fetch only HUB_FILES
    (never .py files).
 2. Hub ids resolve to the "main" revision only; safetensors only, never pickle (.bin) checkpoints.
"""
import json
import os
import re
import shutil
from pathlib import Path

import torch

# our parameter name prefix -> transformers' name prefix (the entire checkpoint mapping)
HF_PREFIX = {"embed_tokens.": "model.embed_tokens.", "layers.": "model.layers.", "norm.": "model.norm.",
             "lm_head.": "lm_head."}
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)  # old checkpoints saved this buffer; we recompute it


class ModelError(ValueError):
    """A user mistake in a model folder, a model id or a memory budget; the message is one line
    naming the file."""


# ---- model folders, hub ids, tokenizers: one-line errors, never custom code ----
# config, weights, tokenizer; no .py
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


def one_line(e) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def read_json(file):
    try:
        return json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{file}: not valid JSON ({one_line(e)})") from None


def refuse_custom_code(cfg, file):
    """A folder whose config names its own Python classes (auto_map) is refused: we never run code
    from a model."""
    if isinstance(cfg, dict) and "auto_map" in cfg:
        raise ModelError(f"{file}: has auto_map (custom model code); refused, this repo never runs code shipped "
                         "with a model (trust_remote_code=False)")


def read_config(path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found (expected a Hugging Face model folder)")
    cfg = read_json(file)
    refuse_custom_code(cfg, file)
    return cfg


def weight_files(path) -> list:
    """The safetensors files of a model folder: model.safetensors, or the shards named by its
    index."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        wm = read_json(index)
        if not isinstance(wm, dict) or not isinstance(wm.get("weight_map"), dict):
            raise ModelError(f"{index}: expected an object with a weight_map")
        files = [path / f for f in sorted(set(wm["weight_map"].values()))]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path} "
                                "(only safetensors checkpoints are supported)")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint shard {f} not found")
    return files


def load_tensors(file, device, dtype, tied) -> dict:
    """{transformers name: tensor} of one safetensors file, cast to dtype; tied: skip a stored
    lm_head.weight."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            return {n: f.get_tensor(n).to(dtype) for n in f.keys()
                    if not n.endswith(IGNORED_HF_SUFFIXES) and not (tied and n == "lm_head.weight")}
    except (SafetensorError, OSError) as e:  # garbage, truncated or unreadable
        raise ModelError(f"{file}: not a readable safetensors file ({one_line(e)})") from None



def read_weights(path, device, dtype, tied) -> dict:
    """{our parameter name: tensor} of a folder's safetensors, renamed by HF_PREFIX; tied: lm_head =
    embed_tokens."""
    to_ours = {hf: ours for ours, hf in HF_PREFIX.items()}
    state = {}
    for file in weight_files(path):
        for name, t in load_tensors(file, device, dtype, tied).items():
            prefix = next((p for p in to_ours if name.startswith(p)), None)
            if prefix is None:
                raise ModelError(f"{file}: unexpected tensor {name!r}")
            state[to_ours[prefix] + name[len(prefix):]] = t
    if tied and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def stored_dtype(path):
    """The dtype most of a folder's weights are stored in, read from the safetensors headers (None
    if unknown)."""
    count = {}
    try:
        for file in weight_files(Path(path)):
            with open(file, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            for name, t in header.items():
                if name != "__metadata__" and t["dtype"] in SAFETENSORS_DTYPES:
                    n = 1
                    for d in t["shape"]:
                        n *= d
                    count[t["dtype"]] = count.get(t["dtype"], 0) + n
    # a header we cannot read: keep the tensors' own dtype
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return SAFETENSORS_DTYPES[max(count, key=count.get)] if count else None


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def write_weights(path, state, config, tied, source=None, dtype=None):
    """{our name: tensor} -> path/model.safetensors in transformers' names, config.json (config,
    dtype updated) and generation_config.json: source's (a model folder) copied unchanged when it
    has one, else built from config. dtype: cast the floating-point tensors to it (None: as they
    are)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, t in state.items():
        if tied and name == "lm_head.weight":
            continue  # tied: transformers re-ties it from embed_tokens
        prefix = next(p for p in HF_PREFIX if name.startswith(p))
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[HF_PREFIX[prefix] + name[len(prefix):]] = t.contiguous().cpu()
    dtype = next(iter(out.values())).dtype
    cfg = dict(config, dtype=str(dtype).removeprefix("torch."), tie_word_embeddings=tied)
    cfg.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = Path(source) / "generation_config.json" if source is not None else None
    if gen is not None and gen.is_file():
        if gen.resolve() != (path / "generation_config.json").resolve():
            shutil.copyfile(gen, path / "generation_config.json")
    else:
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if cfg.get(k) is not None}
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})

def hub_cache() -> str:
    """The hub cache folder the way huggingface_hub finds it, read from the environment now (not at
    import)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"),
                                                     "huggingface")
    return os.path.expanduser(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
                              or os.path.join(home, "hub"))


def resolve_model(name_or_path, what="--model") -> str:
    """A local model folder, or a hub id ORG/NAME -> its snapshot folder in the hub cache
    (downloading config, safetensors and tokenizer files when online; never .py files). `what` names
    the flag in error messages."""
    if not str(name_or_path):  # Path("") is the working directory
        raise ModelError(f"{what} is empty: pass a model folder or a Hugging Face id ORG/NAME")
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"{what} {name_or_path}: folder has no config.json (not a Hugging Face model folder)")
        return str(p)
    if not re.fullmatch(r"\w[\w.-]*/\w[\w.-]*", str(name_or_path)):  # ./x, ../x are paths, not ids
        raise ModelError(f"{what} {name_or_path}: no such folder, and not a Hugging Face id ORG/NAME")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    cache = hub_cache()
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    try:
        folder = snapshot_download(str(name_or_path), cache_dir=cache, allow_patterns=HUB_FILES,
                                   local_files_only=offline)
    except LocalEntryNotFoundError:
        raise ModelError(f"{what} {name_or_path}: not in the Hugging Face cache (HF_HUB_CACHE={cache}) and "
                         f"{'offline (HF_HUB_OFFLINE=1)' if offline else 'the hub is unreachable'}; download it once "
                         "online, or pass a local folder") from None
    # unknown or gated repo, bad revision, disk full
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ModelError(f"{what} {name_or_path}: {type(e).__name__} from the hub ({one_line(e)})") from None
    if not (Path(folder) / "config.json").is_file():
        raise ModelError(f"{what} {name_or_path}: the hub snapshot {folder} has no config.json")
    return folder


def load_tokenizer(path):
    """AutoTokenizer of a local folder (trust_remote_code=False; an auto_map is refused) with
    one-line errors."""
    from transformers import AutoTokenizer
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} not found")
    for name in ("config.json", "tokenizer_config.json"):
        if (path / name).is_file():
            refuse_custom_code(read_json(path / name), path / name)
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelError(f"{path}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    # transformers' messages run 3-5 lines
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"{path}: cannot load a tokenizer ({one_line(e)})") from None



def check_vocab(tokenizer, vocab_size, path):
    """A tokenizer with token ids past the model's embedding table (config.json vocab_size) is a
    one-line ModelError, raised where tokenizer and model meet, before any work."""
    top = max(tokenizer.get_vocab().values(), default=-1)   # added tokens included
    if top >= vocab_size:
        raise ModelError(f"{path}: the tokenizer has token ids up to {top}, but the model's "
                         f"vocabulary (config.json vocab_size) has {vocab_size}: use the tokenizer "
                         "the model was trained with")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        cfg = {"model_type": "llama", "hidden_size": 4, "vocab_size": 3}
        state = {"embed_tokens.weight": torch.randn(3, 4), "norm.weight": torch.ones(4)}
        write_weights(d, state, cfg, tied=True)
        back = read_weights(Path(d), "cpu", torch.float32, tied=True)
        print(f"wrote and read {sorted(back)} ({stored_dtype(d)}); config {read_config(d)}")
        (Path(d) / "config.json").write_text("{not json")
        try:
            read_config(d)
        except ModelError as e:
            print(f"error: {e}")
    print(f"hub cache: {hub_cache()}")

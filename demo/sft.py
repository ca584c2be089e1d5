"""The demo's starting policy pi_1: a char-level tokenizer and a tiny Llama, SFT'd on the teacher.

    python demo_sft.py --sft_steps 100          # pi_1 in a temporary folder, and its answers
    python -c "import demo_sft as s; s.prepare('runs/i80', 0, s.Config(teacher_styles='0.8,0.15,0.05'))"
    from demo.sft import prepare, Config
    model_dir, prompts_path = prepare("runs/demo/demo", seed=0)   # cached: reruns reuse the folder

prepare is what train.py runs for its built-in demo (no --model and --prompts): it makes the
tokenizer (make_tokenizer: one id per character, a ChatML template; the tests build theirs with it
too), a ~0.14M-parameter Llama (model.py), fine-tunes it on teacher demonstrations from
demo_task.py (whose prompts are disjoint from prompts.jsonl's), and writes out_dir/init in the
Hugging Face layout plus out_dir/prompts.jsonl (prompt, gold = the teacher's answer). A stamp,
init/demo_task.json, names the settings: a rerun with the same ones does nothing.

Departures from the paper (numbered):
  1. The policy is a ~0.14M-parameter char-level Llama pretrained here by SFT on teacher
     demonstrations (mistakes included, so pi_1 starts level with the teacher), not Orca-2.5 (7B).
"""
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace

from dnolib.cli import cli
from demo.task import (LONG, P_ROTATE, P_TAIL, parse_lengths, parse_styles, prompt_rows,
                       rubric)

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHARS = list(" \n0123456789,|:") + [chr(c) for c in range(ord("a"), ord("z") + 1)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(path=None, chars=CHARS):
    """A char-level PreTrainedTokenizerFast: 5 specials, then one id per character (the demo's 41:
    space, newline, digits, ',|:', a-z), with a ChatML template; saved to `path` if given. The tests
    build theirs with it too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + list(chars))},
                                      unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # every character is one token
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHAT_TEMPLATE
    if path is not None:
        tok.save_pretrained(str(path))
    return tok


def hf_config(vocab_size, dim, n_layers, n_heads, ffn):
    """A Llama config dict in the Hugging Face layout (read by model.ModelArgs.from_hf_config)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
            "hidden_size": dim, "intermediate_size": ffn, "num_hidden_layers": n_layers,
            "num_attention_heads": n_heads, "num_key_value_heads": n_heads, "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32"}


def sft_batch(tok, rows):
    """Right-padded (idx, targets, mask): next-token targets, loss on the response and its </s>
    only."""
    import torch

    seqs, masks = [], []
    for prompt, response in rows:
        p = tok.encode(prompt)
        r = tok.encode(response, add_special_tokens=False) + [tok.eos_token_id]
        seqs.append(p + r)
        masks.append([0] * len(p) + [1] * len(r))
    T = max(len(s) for s in seqs)
    ids = torch.tensor([s + [tok.pad_token_id] * (T - len(s)) for s in seqs])  # (B, T)
    mask = torch.tensor([m + [0] * (T - len(m)) for m in masks])  # (B, T)
    return ids[:, :-1], ids[:, 1:], mask[:, 1:]


def sft(model, tok, rows, steps, batch_size, lr, seed, log=print):
    """Supervised fine-tuning on (prompt, teacher response) rows with AdamW and a cosine schedule; a
    progress bar (with ETA) on stderr when log is print, and the loss every 50 steps through log."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    bar = tqdm(range(steps), desc="demo SFT", unit="step", file=sys.stderr,
               disable=log is not print)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * (min(1.0,
                                (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps)))
        idx, tgt, mask = sft_batch(tok, rng.sample(rows, batch_size))
        logits = model(idx)  # (B, T, V)
        logits = getattr(logits, "logits", logits)
        nll = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="none")  # (B*T,)
        loss = (nll * mask.flatten()).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            (tqdm.write if log is print else log)(f"sft step {step:4d} | loss {loss.item():.4f}")
    model.eval()
    return model


# ----------------------------------------------------------------------------- prepare: SFT'd init

@dataclass
class Config:
    seed: int = 0                 # seeds the prompts, the teacher and the SFT
    teacher_styles: str = "0.55,0.3,0.15"  # the teacher's style mix (demo/task.py, departure 2)
    lengths: str = "3,7"          # digits per prompt: min,max (2 <= min <= max <= 9)
    n_prompts: int = 1000         # prompts.jsonl rows (train.py cuts them into T slices + validation)
    n_demos: int = 4000           # teacher demonstrations for SFT (prompts disjoint from prompts.jsonl's)
    dim: int = 64                 # tiny Llama: hidden size
    n_layers: int = 2
    n_heads: int = 4
    ffn: int = 256                # SwiGLU hidden size
    sft_steps: int = 600
    sft_batch: int = 64
    sft_lr: float = 3e-3
    threads: str = "auto"         # CPU threads: auto = what the model size warrants | N


def build_model(cfg, vocab_size, seed):
    import torch
    from dnolib.model import ModelArgs, Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelArgs.from_hf_config(hf_config(vocab_size, cfg.dim, cfg.n_layers,
                                                           cfg.n_heads, cfg.ffn)))
    # GPT-2 / transformers-style init: N(0, 0.02), norms at 1
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.02)
    return model


def prepare(out_dir, seed=0, cfg=None, log=print):
    """Build the tokenizer and the tiny Llama, SFT it on teacher demonstrations, save it in the HF
    layout to out_dir/init, and write out_dir/prompts.jsonl. Cached: reruns with the same settings
    do nothing."""
    import torch
    from dnolib.budget import pick_threads

    cfg = Config(seed=seed) if cfg is None else replace(cfg, seed=seed)
    model_dir, prompts_path = os.path.join(out_dir, "init"), os.path.join(out_dir, "prompts.jsonl")
    # a bad mix: one line, before the SFT
    styles, lengths = parse_styles(cfg.teacher_styles), parse_lengths(cfg.lengths)
    stamp = {k: v for k, v in asdict(cfg).items() if k != "threads"}   # threads: no artifact
    stamp["task"] = [P_TAIL, P_ROTATE, LONG]  # a changed teacher rebuilds
    stamp_path = os.path.join(model_dir, "demo_task.json")
    if os.path.exists(stamp_path) and os.path.exists(prompts_path):
        with open(stamp_path) as f:
            if json.load(f) == json.loads(json.dumps(stamp)):
                log(f"demo_sft: reusing {model_dir} and {prompts_path}")
                return model_dir, prompts_path
    os.makedirs(model_dir, exist_ok=True)
    if os.path.exists(stamp_path):
        os.remove(stamp_path)  # stale: rebuilding
    t0 = time.time()
    tok = make_tokenizer()
    rows = prompt_rows(cfg.n_prompts, cfg.seed, "p", styles=styles, lengths=lengths)
    demos = prompt_rows(cfg.n_demos, cfg.seed, "sft", {r["prompt"] for r in rows}, styles, lengths)
    demos = [(r["prompt"], r["gold"]) for r in demos]
    with torch.random.fork_rng():  # leaves the caller's torch RNG as it was
        model = build_model(cfg, len(tok), cfg.seed)
        n_params = sum(p.numel() for p in model.parameters())
        # the demo's 0.14M parameters: 1 thread
        torch.set_num_threads(pick_threads(cfg.threads, n_params))
        log(f"demo_sft: SFT of a {n_params / 1e6:.2f}M-param Llama on {len(demos)} teacher "
            "demonstrations")
        sft(model, tok, demos, cfg.sft_steps, cfg.sft_batch, cfg.sft_lr, cfg.seed, log=log)
    model.save_pretrained(model_dir, tokenizer=tok)
    tmp = prompts_path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, prompts_path)
    # written last: its presence means everything above is complete
    with open(stamp_path, "w") as f:
        json.dump(stamp, f)
    log(f"demo_sft: wrote {model_dir} and {prompts_path} in {time.time() - t0:.0f}s")
    return model_dir, prompts_path


if __name__ == "__main__":
    import tempfile

    cfg = cli(Config)
    try:
        parse_styles(cfg.teacher_styles)
        parse_lengths(cfg.lengths)
    except ValueError as e:
        sys.exit(f"error: {e}")
    import torch

    from dnolib.model import Transformer

    with tempfile.TemporaryDirectory() as d:
        model_dir, prompts_path = prepare(d, cfg.seed, cfg)
        model = Transformer.from_pretrained(model_dir)
        tok = make_tokenizer()
        with open(prompts_path) as f:
            rows = [json.loads(line) for line, _ in zip(f, range(4))]
        for r in rows:        # greedy answers of pi_1, one token at a time (no KV cache: a demo)
            ids = tok.encode(r["prompt"])
            with torch.no_grad():
                for _ in range(16):
                    nxt = model(torch.tensor([ids]))[0, -1].argmax().item()
                    if nxt == tok.eos_token_id:
                        break
                    ids.append(nxt)
            y = tok.decode(ids[len(tok.encode(r["prompt"])):])
            print(f"{r['prompt'].strip():22s} pi_1 {y!r:18s} score {rubric(r['prompt'], y)}/6   "
                  f"teacher {r['gold']!r}")

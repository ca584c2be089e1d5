"""Test fixture: a real third-party OpenAI-compatible server (llama-cpp-python) on 127.0.0.1 serving a tiny
random Llama written here with the `gguf` package (no hub, no network).

    from llama_server import llama_server     # pytest fixture (session scope) -> base_url "http://127.0.0.1:P/v1"
    python tests/llama_server.py              # start one by hand; prints the base_url, Ctrl-C stops it

The model: 2 layers, 64 wide, a char-level SentencePiece-style vocab. Its output layer adds a large bias to
the letters A and B (so verdicts are always among the top log-probs) and a large negative one to byte and
control tokens (so free text decodes cleanly); which of A / B wins still depends on the context.
Requires `pip install 'llama-cpp-python[server]==0.3.36' gguf==0.19.0`; tests skip cleanly without it. The
build that README and .ci/run give (CMAKE_ARGS in tests/requirements.txt) leaves out what no test uses: the
multimodal library, llama.cpp's common library (tests/llama_cpp_lean.cmake) and optimisation beyond -O1; the
server, its chat template and its top log-probs are the same.
"""
import os, socket, string, subprocess, sys, time, urllib.request

MODEL_ALIAS = "tiny"


def write_gguf(path, seed=0):
    import numpy as np, gguf
    T, S = gguf.TokenType, "\u2581"  # S: SentencePiece's word-start mark
    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<unk>", T.UNKNOWN), ("<s>", T.CONTROL), ("</s>", T.CONTROL), ("<|im_start|>", T.CONTROL),
             ("<|im_end|>", T.CONTROL)] + [(f"<0x{b:02X}>", T.BYTE) for b in range(256)]
    vocab += [(t, T.NORMAL) for t in [S, "\n"] + chars + [S + c for c in chars]]
    E, L, H, F, V = 64, 2, 4, 128, len(vocab)
    rng = np.random.default_rng(seed)
    rand = lambda *shape, scale=0.2: (rng.standard_normal(shape) * scale).astype(np.float32)
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(4096); w.add_embedding_length(E); w.add_block_count(L); w.add_feed_forward_length(F)
    w.add_head_count(H); w.add_head_count_kv(H); w.add_rope_dimension_count(E // H)
    w.add_layer_norm_rms_eps(1e-5); w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama"); w.add_token_list([t for t, _ in vocab]); w.add_token_scores([0.0] * V)
    w.add_token_types([k for _, k in vocab]); w.add_bos_token_id(1); w.add_eos_token_id(4)
    w.add_unk_token_id(0); w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    # channel 0 of the residual stream is a constant 3.0 that no layer writes (their output rows 0 are zero),
    # so column 0 of the output layer acts as a per-token logit bias
    emb, out = rand(V, E, scale=1.0), rand(V, E, scale=0.1)
    emb[:, 0] = 3.0
    bias = {"A": 5.0, "B": 5.0, "<|im_end|>": -1.0}
    out[:, 0] = [bias.get(t, 0.0) if k == T.NORMAL or t == "<|im_end|>" else -20.0 for t, k in vocab]
    tensors = {"token_embd.weight": emb, "output_norm.weight": np.ones(E, np.float32), "output.weight": out}
    for i in range(L):
        p = f"blk.{i}."
        tensors.update({p + "attn_norm.weight": np.ones(E, np.float32), p + "ffn_norm.weight": np.ones(E, np.float32),
                        p + "attn_q.weight": rand(E, E), p + "attn_k.weight": rand(E, E),
                        p + "attn_v.weight": rand(E, E), p + "attn_output.weight": rand(E, E),
                        p + "ffn_gate.weight": rand(F, E),
                        p + "ffn_up.weight": rand(F, E), p + "ffn_down.weight": rand(E, F)})
        tensors[p + "attn_output.weight"][0] = 0
        tensors[p + "ffn_down.weight"][0] = 0
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir, threads=1, timeout=120):
    """-> (base_url, Popen). Writes the GGUF, starts `python -m llama_cpp.server`, waits for /v1/models."""
    model = write_gguf(os.path.join(workdir, "tiny.gguf"))
    port = free_port()
    log = open(os.path.join(workdir, "server.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", model, "--model_alias", MODEL_ALIAS,
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", str(threads),
                             "--n_threads_batch", str(threads), "--interrupt_requests", "False"],
                            stdout=log, stderr=subprocess.STDOUT)
    base, t0 = f"http://127.0.0.1:{port}/v1", time.time()
    while True:
        try:
            urllib.request.urlopen(base + "/models", timeout=2).read()
            return base, proc
        except OSError:
            if proc.poll() is not None or time.time() - t0 > timeout:
                proc.kill()
                raise RuntimeError(f"llama_cpp.server did not start; see {log.name}")
            time.sleep(0.25)


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


try:
    import pytest

    @pytest.fixture(scope="session")
    def llama_server(tmp_path_factory):
        pytest.importorskip("llama_cpp", reason="llama-cpp-python[server] not installed (CI installs it)")
        pytest.importorskip("gguf", reason="gguf not installed (CI installs it)")
        base, proc = start_server(str(tmp_path_factory.mktemp("llama")))
        yield base
        stop_server(proc)
except ImportError:  # usable as a script without pytest
    pass

if __name__ == "__main__":
    import tempfile
    base, proc = start_server(tempfile.mkdtemp())
    print(f"llama_cpp.server on {base} (model {MODEL_ALIAS!r}); Ctrl-C stops it", flush=True)
    try:
        proc.wait()
    except KeyboardInterrupt:
        stop_server(proc)

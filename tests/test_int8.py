"""INT8 W8A8: the quantization rule, the kernels against the IR references, the per-layer rule of
`--quantize int8`, compressed-tensors int8 checkpoints, and whole plans against transformers.

- Kernels (Triton interpreter): the per-token int8 quantization of `fp8_quant`, `rms_norm_quant` and
  `gated_act_quant` gives `rdnac.ir.fp8.quantize_rows(.., "int8")`'s bits (ties to even, clamping, a zero
  row); `linear_int8` (int32 accumulation, scales in the epilogue, split-K, bias, prequantized x) matches
  `ops.linear_int8` at odd sizes.
- Every target cross-compiles the int8 GEMMs within its LDS, without spills, with its native int8 matrix
  instruction.
- Tiny Llama / Qwen3 (dense) and Qwen3.5 (hybrid GDN) at odd sizes, `--quantize int8` and compressed-tensors
  checkpoints: the plan against transformers on the same dequantized weights, teacher-forced top-1
  agreement >= 95% and min logit cosine >= 0.999 (cpu plans; sm90 plans under the Triton interpreter).
- Bad compressed-tensors int configs get one line naming the field.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from click.testing import CliRunner

import rdnac
import rdnac.cli.main
from rdnac.errors import RdnacError, UnsupportedModelError
from rdnac.compiler.build import check_resources, compile_calls
from rdnac.compiler.passes.quantize import SKIP, quantize_weight
from rdnac.compiler.record import RecordingLauncher

from rdnac.ir import ops
from rdnac.ir.fp8 import quantize_rows
from rdnac.ir import linear_attention as la
from rdnac.kernels import (activation_quant, fp8_quant, gated_rms_norm_quant, gemm_int8, rms_norm_quant,
                           sigmoid_gate_quant)
from rdnac.testing.int8 import write_int8_checkpoint
from tests.support.checkpoints import make_checkpoint
from tests.test_kernels_small import CPU

TARGETS = ("gfx1201", "gfx1151", "gfx942", "gfx950", "sm90")
# per target: the int8 matrix instruction its GEMMs must use (decode tiles use mma.sync on sm90, wgmma above)
NATIVE_INT8 = {"gfx1201": r"v_wmma_i32_16x16x16_iu8", "gfx1151": r"v_wmma_i32_16x16x16_iu8",
               "gfx942": r"v_mfma_i32_\w+_i8", "gfx950": r"v_mfma_i32_\w+_i8", "sm90": r"\.s32\.s8\.s8"}
AGREEMENT, MIN_COSINE = 0.95, 0.999


# ------------------------------------------------------------ the rule and the kernels


def test_quantize_rows_int8_rounds_to_nearest_even_and_clamps():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -127.0, 63.5], [0.0] * 8])  # scale 1 on row 0
    q, s = quantize_rows(x, "int8")
    assert q.dtype == torch.int8 and s.shape == (2, 1) and s.dtype == torch.float32
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2, -127, 64] and s[0].item() == 1.0
    assert q[1].tolist() == [0] * 8 and s[1].item() == 1.0  # a zero row: scale 1, not 0/0


def _rows(num_tokens: int, width: int, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(num_tokens, width, generator=g) * 3).to(dtype)
    x[2] = 0
    x[3, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # amax 127: scale 1, so these sit on the ties
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_quant_kernels_write_the_reference_bits(dtype):
    x = _rows(5, 300, dtype, 0)
    q, s = fp8_quant.quantize_activations(x, None, "int8", 0, launcher=CPU)
    rq, rs = quantize_rows(x, "int8")
    assert q.dtype == torch.int8 and torch.equal(q, rq) and torch.equal(s, rs)

    residual = _rows(5, 300, dtype, 1)
    weight = torch.randn(300, generator=torch.Generator().manual_seed(2)).to(dtype)
    for block_h in (128, 512):  # looping over the row, and one tile
        cfg = {"constexprs": {"BLOCK_H": block_h}, "num_warps": 2, "num_stages": 1}
        fused = rms_norm_quant.rms_norm_quant(x, residual, weight, eps=1e-6, fp8_format="int8", group=0, config=cfg,
                                              launcher=CPU)
        ref = ops.rms_norm_quant(x, residual, weight, eps=1e-6, fp8_format="int8", group=0)
        assert [t.dtype for t in fused] == [t.dtype for t in ref] == [torch.int8, torch.float32, dtype]
        y = ops.rms_norm(x, residual, weight, eps=1e-6)[0]
        # the kernel's y may differ from torch's by the interpreter's bf16 rounding: compare through dequantization
        assert (fused[0].float() * fused[1] - y.float()).abs().max() <= fused[1].max() * 0.5 + 1e-6
        assert torch.equal(fused[0], ref[0]) or dtype == torch.bfloat16

    gate_up = _rows(5, 2 * 150, dtype, 3)
    cfg = {"constexprs": {"BLOCK_I": 128}, "num_warps": 1, "num_stages": 1}
    q, s = activation_quant.gated_act_quant(gate_up, act="silu", fp8_format="int8", group=0, config=cfg, launcher=CPU)
    rq, rs = ops.gated_act_quant(gate_up, act="silu", fp8_format="int8", group=0)
    assert q.dtype == torch.int8 and q.shape == rq.shape == (5, 150)
    if dtype == torch.float32:
        assert torch.equal(q, rq) and torch.equal(s, rs)
    else:  # one bf16 rounding of the activation may move a value across a rounding boundary
        assert (q.int() - rq.int()).abs().max() <= 1 and torch.allclose(s, rs, rtol=1e-2)


def _check_quantized_rows(q, s, rq, rs, y, fmt: str, dtype, shape: tuple[int, int]) -> None:
    """A fused gate-and-quantize kernel's per-token q [T, N] (`shape`), s [T, 1] against the reference's rq, rs
    and the unquantized gated value y (float32); row 2 of the input is zero. The kernel's silu / sigmoid and torch's
    differ in the last fp32 bits, and bf16 rounds the gated value once: scales agree to that, and each value
    lands on (or next to) the reference's grid point."""
    assert q.shape == rq.shape == y.shape == shape and s.shape == rs.shape == (shape[0], 1)
    assert q.dtype == rq.dtype and s.dtype == rs.dtype == torch.float32
    assert torch.allclose(s, rs, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=0)
    step = s if fmt == "int8" else 2.0 ** -3 * y.abs() + s * 2.0 ** -8  # one grid step (FP8: 3 mantissa bits)
    err = (q.float() * s - y).abs()
    assert (err <= step + (1e-5 if dtype == torch.float32 else 1e-2) * y.abs()).all(), f"max error {err.max():.3g}"
    assert s[2].item() == 1.0 and not q[2].float().any()


def _assert_fits(recorder: RecordingLauncher, target: str) -> list:
    """The recorded launches' binaries for `target`, each within its LDS and without spills."""
    binaries = compile_calls(recorder.calls, target, quiet=True)
    for b in binaries:
        assert check_resources(b, target) == [], b.key
    return binaries


@pytest.mark.parametrize("fmt", ["int8", "e4m3fn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rms_norm_quant_matches_reference(fmt, dtype):
    """The GDN gated norm with out_proj's per-token quantization: 3 heads of 10 (rows strided, as the split
    of the merged in_proj gives them), a zero row."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(6, 40, generator=g) * 2).to(dtype)[:, :30]  # [T, H*D], row stride 40
    gate = torch.randn(6, 30, generator=g).to(dtype)
    x[2] = 0
    weight = (1 + 0.1 * torch.randn(10, generator=g)).to(dtype)
    attrs = dict(num_heads=3, head_dim=10, eps=1e-6, fp8_format=fmt, group=0)
    config = gated_rms_norm_quant.default_config({"num_heads": 3, "head_dim": 10})
    q, s = gated_rms_norm_quant.gated_rms_norm_quant(x, gate, weight, **attrs, config=config, launcher=CPU)
    rq, rs = la.gated_rms_norm_quant(x, gate, weight, **attrs)
    y = la.gated_rms_norm(x, gate, weight, num_heads=3, head_dim=10, eps=1e-6).float()
    _check_quantized_rows(q, s, rq, rs, y, fmt, dtype, (6, 30))


@pytest.mark.parametrize("target", TARGETS)
def test_gated_rms_norm_quant_fits_every_target_at_the_27b_width(target):
    """Qwen3.5-27B's GDN output, 48 value heads of 128 in one program per token: within LDS, no spills."""
    recorder = RecordingLauncher()
    x = torch.empty(8, 48 * 128, dtype=torch.bfloat16, device="meta")
    weight = torch.empty(128, dtype=torch.bfloat16, device="meta")
    problem = {"num_heads": 48, "head_dim": 128}
    gated_rms_norm_quant.gated_rms_norm_quant(x, x, weight, num_heads=48, head_dim=128, eps=1e-6, fp8_format="int8",
                                              config=gated_rms_norm_quant.default_config(problem), launcher=recorder)
    _assert_fits(recorder, target)


@pytest.mark.parametrize("fmt", ["int8", "e4m3fn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_n", [64, 256])  # looping over the row, and one tile
def test_sigmoid_gate_quant_matches_reference(fmt, dtype, block_n):
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(5, 300, generator=g) * 2).to(dtype)[:, :150]  # [T, N], rows strided (a split's columns)
    gate = torch.randn(5, 150, generator=g).to(dtype)
    x[2] = 0
    config = {"constexprs": {"BLOCK_N": block_n}, "num_warps": 1, "num_stages": 1}
    q, s = sigmoid_gate_quant.sigmoid_gate_quant(x, gate, fp8_format=fmt, config=config, launcher=CPU)
    rq, rs = la.sigmoid_gate_quant(x, gate, fp8_format=fmt)
    # the kernel's sigmoid (1 / (1 + exp(-x))) and torch's differ in the last fp32 bits, as silu's do
    _check_quantized_rows(q, s, rq, rs, la.sigmoid_gate(x, gate).float(), fmt, dtype, (5, 150))


@pytest.mark.parametrize("target", TARGETS)
def test_sigmoid_gate_quant_fits_every_target_at_the_27b_width(target):
    """Qwen3.5-27B's gated attention output, 24 heads of 256: within LDS, no spills."""
    recorder = RecordingLauncher()
    x = torch.empty(8, 24 * 256, dtype=torch.bfloat16, device="meta")
    sigmoid_gate_quant.sigmoid_gate_quant(x, x, fp8_format="int8",
                                          config=sigmoid_gate_quant.default_config({"N": 24 * 256}),
                                          launcher=recorder)
    _assert_fits(recorder, target)


def _int8_operands(M, N, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    if M > 3:
        x[2] = 0
    w = torch.randn(N, K, generator=g)
    bits, scale = quantize_weight(w, "channel", fmt="int8")
    return x, bits, scale / K ** 0.5, torch.randn(N, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 200, 328), (7, 96, 1000), (33, 130, 72)])
def test_linear_int8_matches_reference(M, N, K, dtype):
    x, bits, scale, bias = _int8_operands(M, N, K, dtype, seed=M)
    ref = ops.linear_int8(x, bits, scale, bias, weight_scheme="channel", act_scheme="dynamic_token", has_bias=True)
    problem = gemm_int8._problem({"weight_scheme": "channel", "act_scheme": "dynamic_token", "has_bias": True},
                                 [x, bits], "prefill", {})
    default = gemm_int8.default_config(problem)
    configs = [default, {**default, "constexprs": {**default["constexprs"], "BLOCK_K": 32, "SPLIT_K": 2}},
               {**default, "constexprs": {**default["constexprs"], "BLOCK_K": 32, "SPLIT_K": 3, "SELF_REDUCE": True}}]
    atol, rtol = (2e-5, 2e-5) if dtype == torch.float32 else (2e-3, 1.6e-2)
    for config in configs:
        out = gemm_int8.linear_int8(x, bits, scale, bias, weight_scheme="channel", act_scheme="dynamic_token",
                                    has_bias=True, config=config, launcher=CPU)
        assert out.shape == ref.shape == (M, N) and out.dtype == ref.dtype == dtype
        err = (out.float() - ref.float()).abs().max().item()
        assert torch.allclose(out.float(), ref.float(), atol=atol, rtol=rtol), f"{config}: max abs error {err:.3g}"
    # prequantized (from a fused norm) and per-tensor weights
    xq, xs = quantize_rows(x, "int8")
    tensor_scale = scale[:1].clone()
    out = gemm_int8.linear_int8(xq, bits, tensor_scale, xs, weight_scheme="tensor", act_scheme="prequantized",
                                out_dtype=str(dtype).removeprefix("torch."), config=default, launcher=CPU)
    ref = ops.linear_int8(xq, bits, tensor_scale, xs, weight_scheme="tensor", act_scheme="prequantized",
                          out_dtype=str(dtype).removeprefix("torch."))
    assert torch.allclose(out.float(), ref.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("target", TARGETS)
def test_int8_gemms_cross_compile_with_native_int8_instructions(target):
    """Decode, middle and prefill tiles (with decode's split-K reduce) of the default configs: within LDS,
    no spills, and the GEMM's dot on the target's integer matrix instruction."""
    recorder = RecordingLauncher()
    N, K = 1536, 4096
    for M in (1, 64, 2048):
        x = torch.empty(M, K, dtype=torch.bfloat16, device="meta")
        weight = torch.empty(N, K, dtype=torch.int8, device="meta")
        scale, bias = torch.empty(N, device="meta"), torch.empty(N, dtype=torch.bfloat16, device="meta")
        problem = gemm_int8._problem({"weight_scheme": "channel", "act_scheme": "dynamic_token", "has_bias": True},
                                     [x, weight], "prefill", {})
        gemm_int8.linear_int8(x, weight, scale, bias, weight_scheme="channel", act_scheme="dynamic_token",
                              has_bias=True, config=gemm_int8.default_config(problem), launcher=recorder)
    binaries = _assert_fits(recorder, target)
    gemms = [b for b in binaries if b.kernel.endswith("_int8_gemm_kernel")]
    assert len(gemms) == 3
    for b in gemms:
        assert any(re.search(NATIVE_INT8[target], i) for i in b.resources.matrix_instructions), \
            f"{target} {b.key}: int8 dot lowered to {b.resources.matrix_instructions}"


# ------------------------------------------------------------ plans against transformers

# odd sizes: hidden 72, 6 heads of 16 over 2 KV heads, intermediate 136
DENSE = dict(hidden_size=72, intermediate_size=136, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
             vocab_size=300)
PROMPT = torch.randint(1, 256, (64,), generator=torch.Generator().manual_seed(3)).tolist()


def _dequantized_like_quantize(model, rule: dict) -> dict[str, torch.Tensor]:
    """transformers' state dict with every decoder linear `--quantize int8` quantizes replaced by its
    dequantized int8 form (the same quantize_weight; lm_head, embeddings and the rule's linears as they are)."""
    state = {}
    for name, t in model.state_dict().items():
        is_linear = re.fullmatch(r"model\.layers\.\d+\.(self_attn|mlp|linear_attn)\.(shared_expert\.)?\w+_proj\w*"
                                 r"\.weight", name)
        if is_linear and not any(re.search(p, name) for p in rule):
            bits, scale = quantize_weight(t, "channel", fmt="int8")
            t = bits.float() * scale[:, None]
        state[name] = t
    return state


def _compare(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    agreement = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    cosine = torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min().item()
    print(f"\n{what}: top-1 agreement {agreement:.1%}, min cosine {cosine:.5f}")
    assert agreement >= AGREEMENT, f"{what}: top-1 agreement {agreement:.1%}"
    assert cosine >= MIN_COSINE, f"{what}: min logit cosine {cosine:.5f}"


def _model(model_type: str, directory, **extra):
    from tests.test_qwen3_5 import CONFIG

    config = CONFIG if model_type == "qwen3_5_text" else {**DENSE, **extra}
    return make_checkpoint(model_type, directory, **config)


def _reference(model, state) -> torch.Tensor:
    model = type(model)(model.config).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0].float()


@pytest.fixture(scope="module")
def qwen3_5(tmp_path_factory):
    directory = tmp_path_factory.mktemp("int8_q35")
    return directory, _model("qwen3_5_text", directory / "ckpt")


def _checkpoint(model_type: str, qwen3_5, tmp_path):
    """(folder holding ckpt/, transformers model): the module's Qwen3.5, or a fresh `model_type` in tmp_path."""
    return qwen3_5 if model_type == "qwen3_5_text" else (tmp_path, _model(model_type, tmp_path / "ckpt"))


@pytest.mark.parametrize("model_type", ["qwen3", "qwen3_5_text"])
def test_quantize_int8_cpu_plan_matches_transformers(model_type, qwen3_5, tmp_path):
    directory, model = _checkpoint(model_type, qwen3_5, tmp_path)
    plan = rdnac.compile(directory / "ckpt", target="cpu", output=tmp_path / "p.msgpack", quiet=True, quantize="int8")
    llm = rdnac.load(plan)
    ops_ = llm.graph.op_counts()
    assert ops_.get("linear_int8") and ops_.get("rms_norm_quant") and ops_.get("gated_act_quant")
    if model_type == "qwen3_5_text":  # out_proj's and o_proj's activations come quantized from their producers
        assert ops_.get("gated_rms_norm_quant") == 2 and "gated_rms_norm" not in ops_
        assert ops_.get("sigmoid_gate_quant") == 1 and "sigmoid_gate" not in ops_
    _compare(llm.logits(PROMPT), _reference(model, _dequantized_like_quantize(model, SKIP["int8"])),
             f"{model_type} --quantize int8")


@pytest.mark.parametrize("model_type", ["llama", "qwen3_5_text"])
def test_compressed_tensors_int8_checkpoint_matches_transformers(model_type, qwen3_5, tmp_path):
    directory, model = _checkpoint(model_type, qwen3_5, tmp_path)
    deq = write_int8_checkpoint(directory / "ckpt", tmp_path / "int8", seed=1)
    config = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "int-quantized"
    plan = rdnac.compile(tmp_path / "int8", target="cpu", output=tmp_path / "p.msgpack", quiet=True)
    llm = rdnac.load(plan)
    int8 = {k for k, s in llm.graph.weights.items() if s.dtype == "int8"}
    assert any("down_proj" in k for k in int8) and any("o_proj" in k for k in int8)
    assert not any("in_proj" in k for k in int8)  # ignored by the checkpoint's recipe
    if model_type == "qwen3_5_text":
        assert any("out_proj" in k for k in int8)
    # every other linear is int8: Qwen3.5's gated q_proj too (its int8 rows and scales reordered, not dequantized)
    float_linears = [n.name for n in llm.graph.nodes if n.op in ("linear", "linear_gated_act")]
    assert all("in_proj" in name for name in float_linears), float_linears
    _compare(llm.logits(PROMPT), _reference(model, deq), f"{model_type} compressed-tensors int8")


def test_the_per_layer_rule_is_logged_shown_and_overridable(qwen3_5, tmp_path):
    directory, _ = qwen3_5
    plan = rdnac.compile(directory / "ckpt", target="cpu", output=tmp_path / "p.msgpack", quiet=True, quantize="int8")
    graph = rdnac.load(plan).graph
    ops_by_name = {n.name: n.op for n in graph.nodes if n.op != "split"}
    assert ops_by_name["layers.0.out_proj"] == "linear_int8" and ops_by_name["layers.1.o_proj"] == "linear_int8"
    assert ops_by_name["layers.1.qkv_proj"] == "linear_int8"  # q (with its gate), k, v merged
    assert ops_by_name["layers.0.gate_up_proj"] == "linear_int8" and ops_by_name["layers.2.down_proj"] == "linear_int8"
    in_proj = [n for n in graph.nodes if "in_proj" in n.name and n.op != "split"]
    assert in_proj and all(n.op == "linear" for n in in_proj)
    shown = CliRunner().invoke(rdnac.cli.main.cli, ["inspect", str(plan), "--decisions"], terminal_width=400)
    assert shown.exit_code == 0, shown.output
    assert "--quantize int8" in shown.output and "in_proj" in shown.output and "recurrence" in shown.output

    everything = tmp_path / "all.msgpack"  # through the CLI: --quantize-skip none quantizes every linear
    done = CliRunner().invoke(rdnac.cli.main.cli, ["compile", str(directory / "ckpt"), "--target", "cpu", "-o",
                                                   str(everything), "-q", "--quantize", "int8",
                                                   "--quantize-skip", "none"])
    assert done.exit_code == 0, done.output
    assert all(n.op == "linear_int8" for n in rdnac.load(everything).graph.nodes
               if "in_proj" in n.name and n.op != "split")
    no_mlp = rdnac.compile(directory / "ckpt", target="cpu", output=tmp_path / "nomlp.msgpack", quiet=True,
                           quantize="int8", quantize_skip=(r"mlp\.",))
    nodes = [n for n in rdnac.load(no_mlp).graph.nodes if n.op != "split"]
    assert all(n.op in ("linear", "linear_gated_act") for n in nodes if "gate_up" in n.name or "down" in n.name)
    assert all(n.op == "linear_int8" for n in nodes if "in_proj" in n.name or "out_proj" in n.name)
    with pytest.raises(RdnacError, match="--quantize-skip requires a regular expression"):
        rdnac.compile(directory / "ckpt", target="cpu", output=tmp_path / "x.msgpack", quantize="int8",
                      quantize_skip=("(",))


def test_qwen3_next_int8_plan_matches_transformers(tmp_path):
    """Qwen3-Next (fused in_proj_qkvz / in_proj_ba, routed experts and a gated shared expert) under --quantize
    int8: the GDN in_proj, the routers, the shared expert's gate and the routed experts keep the compute dtype;
    the shared expert, out_proj and attention go int8; against transformers on the same dequantized weights."""
    from tests.test_qwen3_next import CASES, COMMON

    model = make_checkpoint("qwen3_next", tmp_path / "ckpt", **COMMON, **CASES["qwen3_next"][1])
    plan = rdnac.compile(tmp_path / "ckpt", target="cpu", output=tmp_path / "p.msgpack", quiet=True, quantize="int8")
    llm = rdnac.load(plan)
    nodes = {n.name: n.op for n in llm.graph.nodes if n.op != "split"}
    assert all(op == "linear" for name, op in nodes.items() if "in_proj" in name or "shared_expert_gate" in name)
    assert any("shared_expert" in name and op == "linear_int8" for name, op in nodes.items())
    assert nodes["layers.0.out_proj"] == "linear_int8" and nodes["layers.1.o_proj"] == "linear_int8"
    decisions = [d for d in llm.plan.body["decisions"] if d["pass"] == "quantize"]
    assert any(d["action"] == "routed experts kept in the compute dtype" for d in decisions)
    _compare(llm.logits(PROMPT), _reference(model, _dequantized_like_quantize(model, SKIP["int8"])),
             "qwen3_next --quantize int8")


def test_moe_routers_and_experts_keep_the_compute_dtype(tmp_path):
    from rdnac.testing.moe import write_random_moe_checkpoint

    ckpt = write_random_moe_checkpoint(tmp_path / "moe", "qwen3-moe-tiny")
    plan = rdnac.compile(ckpt, target="cpu", output=tmp_path / "moe.msgpack", quiet=True, quantize="int8")
    llm = rdnac.load(plan)
    decisions = [d for d in llm.plan.body["decisions"] if d["pass"] == "quantize"]
    assert any(d["action"] == "routed experts kept in the compute dtype" for d in decisions)
    assert any("an MoE router" in d["reason"] for d in decisions)
    ops_ = llm.graph.op_counts()
    assert ops_.get("moe_experts") and ops_.get("linear_int8")  # the experts as they were; attention int8
    routers = [n for n in llm.graph.nodes if n.op == "moe_route"]
    producers = {o: n for n in llm.graph.nodes for o in n.outputs}
    assert routers and all(producers[r.inputs[0]].op == "linear" for r in routers)


# ------------------------------------------------------------ sm90 plans under the Triton interpreter


@pytest.mark.parametrize("model_type", ["qwen3", "qwen3_5_text"])
def test_sm90_int8_plan_under_the_interpreter_matches_transformers(model_type, qwen3_5, tmp_path):
    directory, model = _checkpoint(model_type, qwen3_5, tmp_path)
    plan = rdnac.compile(directory / "ckpt", target="sm90", output=tmp_path / "p.msgpack", quiet=True,
                         quantize="int8", max_num_seqs=4, max_num_batched_tokens=64)
    llm = rdnac.load(plan, interpret=True)
    kernels = {k["kernel"] for k in llm.plan.body["kernels"]}
    assert any(k.endswith("_int8_gemm_kernel") for k in kernels)
    shown = CliRunner().invoke(rdnac.cli.main.cli, ["inspect", str(plan)], terminal_width=400)
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.split())  # rich wraps long lines
    row = text[text.index("gemm_int8:_int8_gemm_kernel:"):][:300]
    row = row[:row.index(" ", row.index("spills; ") + len("spills; "))]  # up to its first matrix instruction
    assert re.search(NATIVE_INT8["sm90"], row), row  # inspect names the int8 GEMM's matrix instruction
    _compare(llm.logits(PROMPT).float(), _reference(model, _dequantized_like_quantize(model, SKIP["int8"])),
             f"sm90 {model_type} --quantize int8 (interpreted)")


@pytest.fixture(scope="module")
def sm90_int8_plans(qwen3_5, tmp_path_factory):
    """{model type: (sm90 --quantize int8 plan, transformers model)}, compiled before any GPU test runs."""
    out = tmp_path_factory.mktemp("int8_sm90")
    dense = _model("qwen3", out / "qwen3")
    plans = {}
    for model_type, ckpt, model in (("qwen3", out / "qwen3", dense), ("qwen3_5_text", qwen3_5[0] / "ckpt", qwen3_5[1])):
        plans[model_type] = (rdnac.compile(ckpt, target="sm90", output=out / f"{model_type}.msgpack", quiet=True,
                                           quantize="int8", max_num_batched_tokens=64), model)
    return plans


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["qwen3", "qwen3_5_text"])
def test_sm90_int8_plan_on_cuda_matches_transformers(model_type, sm90_int8_plans, no_compiler):
    """The sm90 int8 plan's binaries on the GPU (decode steps from captured graphs) against transformers on the
    dequantized weights: teacher-forced top-1 and logit cosine over a prefill, then batched greedy decode."""
    from rdnac import SamplingParams

    plan, model = sm90_int8_plans[model_type]
    llm = rdnac.load(plan, device="cuda")
    assert llm.runner.graphs is not None
    _compare(llm.logits(PROMPT).float().cpu(), _reference(model, _dequantized_like_quantize(model, SKIP["int8"])),
             f"cuda sm90 {model_type} --quantize int8")
    # decode: greedy tokens of three prompts batched, each teacher-forced through transformers (conditioned on
    # our own tokens, so one near-tie does not cascade): at most one of 16 differs from its argmax
    reference = type(model)(model.config).eval()
    reference.load_state_dict(_dequantized_like_quantize(model, SKIP["int8"]))
    prompts = [PROMPT[:40], PROMPT[3:20], PROMPT]
    for prompt, out in zip(prompts, llm.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))):
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1:-1]
        misses = int((logits.argmax(-1) != torch.tensor(out.token_ids)).sum())
        assert misses <= 1, f"{misses} of 16 greedy tokens are not transformers' argmax"


# ------------------------------------------------------------ bad input

BAD = {  # field -> (where in the config group, value)
    "weights.num_bits": ("weights", "num_bits", 4),
    "weights.strategy": ("weights", "strategy", "group"),
    "input_activations.dynamic": ("input_activations", "dynamic", False),
    "input_activations.symmetric": ("input_activations", "symmetric", False),
}


@pytest.mark.parametrize("field", list(BAD))
def test_unsupported_int_schemes_are_refused_naming_the_field(field, tmp_path):
    model = make_checkpoint("llama", tmp_path / "ckpt", **DENSE)
    del model
    write_int8_checkpoint(tmp_path / "ckpt", tmp_path / "int8")
    config = json.loads((tmp_path / "int8" / "config.json").read_text())
    part, key, value = BAD[field]
    config["quantization_config"]["config_groups"]["group_0"][part][key] = value
    (tmp_path / "int8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError) as e:
        rdnac.compile(tmp_path / "int8", target="cpu", output=tmp_path / "x.msgpack", quiet=True)
    message = str(e.value)
    assert "\n" not in message and f"config_groups.group_0.{field} requires" in message and repr(value) in message
    shutil.rmtree(tmp_path / "int8")


def test_packed_int4_format_is_refused_naming_the_field(tmp_path):
    make_checkpoint("llama", tmp_path / "ckpt", **DENSE)
    write_int8_checkpoint(tmp_path / "ckpt", tmp_path / "int8")
    config = json.loads((tmp_path / "int8" / "config.json").read_text())
    config["quantization_config"]["format"] = "pack-quantized"  # how llm-compressor stores int4 weights
    (tmp_path / "int8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError) as e:
        rdnac.compile(tmp_path / "int8", target="cpu", output=tmp_path / "x.msgpack", quiet=True)
    message = str(e.value)
    assert "\n" not in message and "quantization_config.format requires" in message and "'pack-quantized'" in message

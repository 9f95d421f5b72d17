"""q/k RMSNorm + RoPE + KV-cache write as one op (`qk_norm_rope_cache`), its kernel and its pass.

The kernel runs under the Triton interpreter against the op's reference (the
unfused chain of references) and against the unfused kernels; the pass is
checked on tiny Llama and Qwen3 checkpoints: fused and unfused plans agree
bit for bit on cpu, and within bf16 rounding for an sm90 plan run under the
Triton interpreter.
"""

from __future__ import annotations

import copy

import pytest
import torch

import rdnac
from rdnac import SamplingParams
from rdnac.compiler.frontend import build_graph, read_checkpoint
from rdnac.compiler.passes import CompileState, fuse_qk_norm_rope_cache, merge_linears
from rdnac.ir import interpreter, ops, rope_math
from rdnac.ir.verify import verify
from rdnac.kernels import kv_cache, qk_norm_rope_cache, rms_norm, rope
from rdnac.kernels.launch import JitLauncher
from tests.support.checkpoints import make_checkpoint
from tests.test_kernels_small import CPU, ROPE_SCALINGS, _RecordingLauncher, assert_close

PASS = "fuse_qk_norm_rope_cache"
IDS = [1, 2, 3, 4, 5, 6, 7, 9, 11]
has_cuda = torch.cuda.is_available()


# ------------------------------------------------------------ kernel


def _inputs(device, dtype, num_heads, num_kv_heads, head_dim, num_tokens=7, cache_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q, k, v as strided column views of one qkv output, as the merged graph feeds them
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(device, dtype) * 2
    q, k, v = torch.split(qkv, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], 1)
    positions = torch.tensor([0, 1, 15, 16, 4095, 33000, 131071, 7, 8][:num_tokens], device=device)
    slots = torch.tensor([3, -1, 17, 16, 40, -1, 0, 9, 10][:num_tokens], device=device)  # -1: padding
    # non-zero sentinels: slots no token maps to (and padded tokens) must keep them
    k_cache = torch.full((6, 8, num_kv_heads, head_dim), 7.0, dtype=cache_dtype or dtype, device=device)
    norms = [(torch.randn(head_dim, generator=g) * 0.1 + 1).to(device, dtype) for _ in range(2)]
    return q, k, v, positions, slots, k_cache, torch.full_like(k_cache, -3.0), norms


def _unfused_kernels(q, k, v, positions, slots, k_cache, v_cache, norms, attrs, inv_freq, scaling, launcher):
    """The four unfused kernels (two head norms, rope, cache write) with their default configs."""
    h, hk, d = attrs["num_heads"], attrs["num_kv_heads"], attrs["head_dim"]
    if attrs["qk_norm"]:
        kw = dict(head_dim=d, eps=attrs["eps"], unit_offset=attrs["unit_offset"], launcher=launcher)
        q = rms_norm.head_rms_norm(q, norms[0], num_heads=h, config=rms_norm.default_config({"H": d, "num_heads": h}), **kw)
        k = rms_norm.head_rms_norm(k, norms[1], num_heads=hk, config=rms_norm.default_config({"H": d, "num_heads": hk}),
                                   **kw)
    rope_attrs = {key: attrs[key] for key in ("num_heads", "num_kv_heads", "head_dim", "rotary_dim", "theta", "style",
                                              "scaling")}
    q, k = rope.rope(q, k, positions, **rope_attrs, inv_freq=inv_freq, attention_scaling=scaling,
                     config=rope.default_config({"head_dim": d, "num_heads": h, "num_kv_heads": hk}), launcher=launcher)
    kv_cache.kv_cache_write(k, v, slots, k_cache, v_cache, num_kv_heads=hk, head_dim=d,
                            config=kv_cache.default_config({"num_kv_heads": hk, "head_dim": d}), launcher=launcher)
    return q


def _check(launcher, device, dtype, config, num_heads, num_kv_heads, head_dim, rotary_dim, style, qk_norm,
           scaling=None, unit_offset=False, cache_dtype=None, slot_dtype=torch.int64, num_tokens=7,
           exact=True) -> float:
    """Fused kernel vs the reference (tolerance) and vs the unfused kernels (exact, or with `exact=False`
    the reference's tolerance); returns the max diff to the unfused kernels over q' and both caches."""
    q, k, v, positions, slots, k_cache, v_cache, norms = _inputs(device, dtype, num_heads, num_kv_heads, head_dim,
                                                                  num_tokens, cache_dtype)
    slots = slots.to(slot_dtype)
    norms = norms if qk_norm else []
    attrs = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, rotary_dim=rotary_dim,
                 theta=1e6, style=style, scaling=scaling, qk_norm=qk_norm, eps=1e-6, unit_offset=unit_offset)
    inv_freq, attention_scaling = rope_math.rope_inv_freq(rotary_dim, 1e6, scaling)
    inv_freq = inv_freq.to(device)
    caches = {name: (k_cache.clone(), v_cache.clone()) for name in ("fused", "reference", "unfused")}
    out = qk_norm_rope_cache.qk_norm_rope_cache(q, k, v, positions, slots, *caches["fused"], *norms, **attrs,
                                                inv_freq=inv_freq, attention_scaling=attention_scaling,
                                                config=config, launcher=launcher)
    ref = ops.qk_norm_rope_cache(q, k, v, positions, slots, *caches["reference"], *norms, **attrs)
    unfused = _unfused_kernels(q, k, v, positions, slots, *caches["unfused"], norms, attrs, inv_freq,
                               attention_scaling, launcher)
    name = (f"{style} {dtype} H={num_heads}/{num_kv_heads} D={head_dim} R={rotary_dim} qk_norm={qk_norm} "
            f"{scaling and scaling['rope_type']} {config['constexprs']}")
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 1.6e-2)  # cos/sin ulps before rounding
    assert_close(name + " q'", out, ref, atol, rtol)
    tol = (0.0, 0.0) if exact else (atol, rtol)
    for i, what in enumerate(("k_cache", "v_cache")):
        assert_close(f"{name} {what}", caches["fused"][i], caches["reference"][i], atol, rtol)
        assert_close(f"{name} {what} vs unfused kernels", caches["fused"][i], caches["unfused"][i], *tol)
    assert_close(name + " q' vs unfused kernels", out, unfused, *tol)
    padded = slots < 0
    untouched = torch.ones(k_cache.shape[:2], dtype=torch.bool, device=device).flatten()
    untouched[slots[~padded].long()] = False
    assert (caches["fused"][0].flatten(0, 1)[untouched] == 7.0).all(), "a slot no real token maps to was written"
    return max((a.float() - b.float()).abs().max().item()
               for a, b in [(out, unfused), *zip(caches["fused"], caches["unfused"])])


CASES = [  # (Hq, Hk, D, rotary_dim): GQA 3:1 as the tiny checkpoints, 4:1 with partial rotary, MHA
    (6, 2, 16, 16), (8, 2, 32, 16), (4, 4, 64, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,rotary_dim", CASES)
def test_kernel_matches_reference_and_unfused_kernels(dtype, style, qk_norm, num_heads, num_kv_heads, head_dim,
                                                       rotary_dim):
    problem = {"head_dim": head_dim, "num_heads": num_heads, "num_kv_heads": num_kv_heads, "qk_norm": qk_norm}
    space = qk_norm_rope_cache.config_space(problem)
    default = qk_norm_rope_cache.default_config(problem)
    assert default in space
    one_head = next(c for c in space if c["constexprs"]["BLOCK_HEADS"] == 1)  # q and k heads in separate programs
    for config in (default, one_head):
        diff = _check(CPU, "cpu", dtype, config, num_heads, num_kv_heads, head_dim, rotary_dim, style, qk_norm)
        assert diff == 0.0


@pytest.mark.parametrize("qk_norm", [False, True])
def test_kernel_early_metadata_is_bit_identical(qk_norm):
    """EARLY_META (position, slot and RoPE angles before the PDL wait) gives the unfused kernels' bits."""
    from tests.test_kernels_attention import _EarlyMeta

    early = _EarlyMeta(CPU)  # its casts round to nearest, as the GPU's do
    problem = {"head_dim": 32, "num_heads": 8, "num_kv_heads": 2, "qk_norm": qk_norm}
    config = qk_norm_rope_cache.default_config(problem)
    assert _check(early, "cpu", torch.bfloat16, config, 8, 2, 32, 16, "neox", qk_norm) == 0.0
    assert set(early.kernels) == {"_qk_norm_rope_cache_kernel"}


@pytest.mark.parametrize("scaling", ROPE_SCALINGS[1:], ids=lambda s: s["rope_type"])
def test_kernel_rope_scalings(scaling):
    problem = {"head_dim": 32, "num_heads": 8, "num_kv_heads": 2, "qk_norm": True}
    _check(CPU, "cpu", torch.bfloat16, qk_norm_rope_cache.default_config(problem), 8, 2, 32, 32, "neox", True, scaling)


def test_kernel_unit_offset_int32_slots_and_cache_cast():
    problem = {"head_dim": 16, "num_heads": 6, "num_kv_heads": 2, "qk_norm": True}
    config = qk_norm_rope_cache.default_config(problem)
    _check(CPU, "cpu", torch.bfloat16, config, 6, 2, 16, 16, "gptj", True, unit_offset=True, slot_dtype=torch.int32)
    _check(CPU, "cpu", torch.float32, config, 6, 2, 16, 16, "neox", True, cache_dtype=torch.bfloat16)
    _check(CPU, "cpu", torch.bfloat16, config, 6, 2, 16, 16, "neox", True, num_tokens=1)


def test_kernel_fully_padded_batch_writes_no_cache_slot():
    q, k, v, positions, slots, k_cache, v_cache, norms = _inputs("cpu", torch.bfloat16, 6, 2, 16)
    attrs = dict(num_heads=6, num_kv_heads=2, head_dim=16, rotary_dim=16, theta=1e4, qk_norm=True, eps=1e-6)
    inv_freq, scaling = rope_math.rope_inv_freq(16, 1e4, None)
    padded = torch.full_like(slots, -1)
    before = k_cache.clone(), v_cache.clone()
    config = qk_norm_rope_cache.default_config({"head_dim": 16, "num_heads": 6, "num_kv_heads": 2})
    out = qk_norm_rope_cache.qk_norm_rope_cache(q, k, v, positions, padded, k_cache, v_cache, *norms, **attrs,
                                                inv_freq=inv_freq, attention_scaling=scaling, config=config,
                                                launcher=CPU)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1]), "a padded token wrote the cache"
    ref = ops.qk_norm_rope_cache(q, k, v, positions, padded, before[0].clone(), before[1].clone(), *norms, **attrs)
    assert_close("q' of padded tokens (still computed, as the unfused rope does)", out, ref, 0.0, 0.0)


def test_wrapper_runs_on_meta_tensors():
    rec, meta, bf16 = _RecordingLauncher(), "meta", torch.bfloat16
    qkv = torch.empty(5, 24 * 128, dtype=bf16, device=meta)
    q, k, v = qkv[:, :16 * 128], qkv[:, 16 * 128:20 * 128], qkv[:, 20 * 128:]
    cache = torch.empty(8, 16, 4, 128, dtype=bf16, device=meta)
    w = torch.empty(128, dtype=bf16, device=meta)
    index = torch.empty(5, dtype=torch.int64, device=meta)
    out = qk_norm_rope_cache.qk_norm_rope_cache(
        q, k, v, index, index, cache, cache, w, w, num_heads=16, num_kv_heads=4, head_dim=128, rotary_dim=128,
        theta=1e6, qk_norm=True, inv_freq=torch.empty(64, device=meta), attention_scaling=1.0,
        config=qk_norm_rope_cache.default_config({"head_dim": 128, "num_heads": 16, "num_kv_heads": 4}), launcher=rec)
    assert out.shape == (5, 16 * 128) and out.device.type == "meta"
    (call,) = rec.calls
    assert call.kernel.endswith(":_qk_norm_rope_cache_kernel") and "stride_q_row" in call.divisible


# ------------------------------------------------------------ pass


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused_rope")
    for family in ("llama", "qwen3"):
        make_checkpoint(family, root / family, with_tokenizer=True)
    return root


def _step_inputs(graph, num_tokens: int) -> dict[str, torch.Tensor]:
    from rdnac.cli.verify import step_inputs

    return step_inputs(graph, IDS[:num_tokens], 16)


def _run_both(original, fused, weights) -> None:
    """The fused graph gives the same logits and writes the same caches as the original (reference interpreter)."""
    ref_inputs, inputs = _step_inputs(original, len(IDS)), _step_inputs(fused, len(IDS))
    ref = interpreter.run(original, weights, ref_inputs)["logits"]
    ours = interpreter.run(fused, weights, inputs)["logits"]
    assert torch.equal(ours, ref), (ours - ref).abs().max()
    for name in (n for n in inputs if n.startswith(("k_cache", "v_cache"))):
        assert torch.equal(inputs[name], ref_inputs[name]), name


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("merged", [True, False], ids=["merged_qkv", "separate_qkv"])
def test_pass_fuses_and_matches_interpreter(family, merged, checkpoints):
    graph, weights, _ = build_graph(read_checkpoint(checkpoints / family), "float32")
    state = CompileState(graph, weights, "cpu")
    if merged:
        merge_linears.run(state)
    original = copy.deepcopy(state.graph)
    fuse_qk_norm_rope_cache.run(state)
    fused = state.graph
    verify(fused)
    layers = fused.attrs["num_layers"]
    counts = fused.op_counts()
    assert counts["qk_norm_rope_cache"] == layers
    assert not {"rope", "kv_cache_write", "head_rms_norm"} & set(counts)
    qk_norm = family == "qwen3"
    for i in range(layers):
        node = fused.node(f"layers.{i}." + ("qk_norm_rope_cache" if qk_norm else "rope_cache"))
        assert node.outputs == [f"layers.{i}.rope.0"] and node.attrs["qk_norm"] is qk_norm
        assert len(node.inputs) == (9 if qk_norm else 7)
        assert fused.node(f"layers.{i}.attn").inputs[0] == f"layers.{i}.rope.0"
    decisions = [d for d in state.decisions if d["pass"] == PASS]
    assert len(decisions) == layers and all(d["action"].startswith("fused") for d in decisions)
    assert all(("q_norm" in d["action"]) == qk_norm for d in decisions)
    _run_both(original, fused, weights)


def test_pass_logs_why_it_cannot_fuse(checkpoints):
    graph, weights, _ = build_graph(read_checkpoint(checkpoints / "qwen3"), "float32")
    graph.outputs.append("layers.0.rope.1")  # layer 0's k' is needed outside: rope and write stay
    graph.outputs.append("layers.1.q_norm")  # layer 1's q norm is needed outside: the norms stay
    original = copy.deepcopy(graph)
    state = CompileState(graph, weights, "cpu")
    fuse_qk_norm_rope_cache.run(state)
    fused = state.graph
    verify(fused)
    decisions = {d["node"]: d for d in state.decisions if d["pass"] == PASS}
    assert decisions["layers.0.rope"]["action"] == "kept separate"
    assert "graph output" in decisions["layers.0.rope"]["reason"]
    partial = decisions["layers.1.rope_cache"]
    assert partial["action"].startswith("fused layers.1.rope, layers.1.kv_write") and "norms kept" in partial["action"]
    assert fused.node("layers.1.rope_cache").attrs["qk_norm"] is False
    assert [n.op for n in fused.nodes].count("head_rms_norm") == 4
    ref = interpreter.run(original, weights, _step_inputs(original, len(IDS)))
    ours = interpreter.run(fused, weights, _step_inputs(fused, len(IDS)))
    assert all(torch.equal(ours[name], ref[name]) for name in graph.outputs)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cpu_plan_fused_is_bit_identical_and_disable_pass_restores(family, checkpoints, tmp_path):
    ckpt = checkpoints / family
    on = rdnac.load(rdnac.compile(ckpt, output=tmp_path / "on.msgpack"))
    off = rdnac.load(rdnac.compile(ckpt, output=tmp_path / "off.msgpack", disable_passes=(PASS,)))
    layers = on.graph.attrs["num_layers"]
    norms = 2 * layers if family == "qwen3" else 0
    assert on.graph.op_counts()["qk_norm_rope_cache"] == layers
    unfused = {op: off.graph.op_counts().get(op, 0) for op in ("head_rms_norm", "rope", "kv_cache_write",
                                                                "qk_norm_rope_cache")}
    assert unfused == {"head_rms_norm": norms, "rope": layers, "kv_cache_write": layers, "qk_norm_rope_cache": 0}
    assert len(off.graph.nodes) == len(on.graph.nodes) + (norms + 2 * layers) - layers
    skipped = [d for d in off.plan.body["decisions"] if d["pass"] == PASS]
    assert skipped == [{"pass": PASS, "node": "-", "action": "skipped", "reason": "disabled with --disable-pass"}]
    assert torch.equal(on.logits(IDS), off.logits(IDS))


def test_sm90_plan_fused_vs_unfused_under_interpreter(checkpoints, tmp_path):
    import onnx

    from rdnac.cli.onnx_export import export_onnx

    opts = dict(quiet=True, max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16)
    ckpt = checkpoints / "qwen3"
    on = rdnac.load(rdnac.compile(ckpt, "sm90", tmp_path / "on.msgpack", **opts), interpret=True)
    off = rdnac.load(rdnac.compile(ckpt, "sm90", tmp_path / "off.msgpack", disable_passes=(PASS,), **opts),
                     interpret=True)
    program = on.plan.body["program"]
    fused_nodes = [n.name for n in on.graph.nodes if n.op == "qk_norm_rope_cache"]
    assert len(fused_nodes) == 2 and {c["kernel"] for n in fused_nodes for c in program[n].values()} == \
        {"qk_norm_rope_cache.qk_norm_rope_cache"}
    assert len(program) == len(off.plan.body["program"]) - 3 * 2  # 4 launches per layer became 1
    ours, ref = on.logits(IDS).float(), off.logits(IDS).float()
    diff = (ours - ref).abs().max().item()
    print(f"\nsm90 bf16 under the interpreter: fused vs unfused logits max abs diff {diff:.3g}")
    assert diff <= 1e-2 * ref.abs().max().item()
    # decode steps too (one token per step, through the decode bucket's configs)
    prompts = [IDS, IDS[:4]]
    assert [c.token_ids for c in on.generate(prompts, SamplingParams(max_tokens=3))] == \
        [c.token_ids for c in off.generate(prompts, SamplingParams(max_tokens=3))]

    model = onnx.load(str(export_onnx(tmp_path / "on.msgpack", tmp_path / "on.onnx")))
    onnx.checker.check_model(model, full_check=True)
    node = next(n for n in model.graph.node if n.op_type == "qk_norm_rope_cache")
    assert list(node.output) == ["layers.0.rope.0", "k_cache.0.written", "v_cache.0.written"]
    attn = next(n for n in model.graph.node if n.op_type == "attention")
    assert list(attn.input[:3]) == ["layers.0.rope.0", "k_cache.0.written", "v_cache.0.written"]


# ------------------------------------------------------------ on the GPU


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda, reason="needs a CUDA/HIP GPU")
def test_kernel_gpu():
    """JIT-compiled on the GPU in bf16; against the unfused kernels within bf16 rounding (the GPU's reduction
    order for the norm's sum of squares may differ between the two kernels' tile shapes), max diff printed."""
    jit, worst = JitLauncher(), 0.0
    for heads, kv_heads, head_dim, rotary_dim in [*CASES, (32, 8, 128, 128), (16, 2, 128, 64)]:
        problem = {"head_dim": head_dim, "num_heads": heads, "num_kv_heads": kv_heads}
        for config in qk_norm_rope_cache.config_space(problem)[::3]:
            for style in ("neox", "gptj"):
                for qk_norm in (False, True):
                    worst = max(worst, _check(jit, "cuda", torch.bfloat16, config, heads, kv_heads, head_dim,
                                              rotary_dim, style, qk_norm, num_tokens=9, exact=False))
    print(f"\nGPU bf16: fused vs unfused kernels, max abs diff over q' and caches: {worst:.3g}")

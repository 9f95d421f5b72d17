"""Decode attention with q/k norm, RoPE and the KV-cache write fused in (`rope_cache_attention`), and its pass.

The fused decode kernel runs under the Triton interpreter against the op's
reference (tolerance) and against the unfused pair it replaces,
qk_norm_rope_cache + attention_decode (bit for bit: the output and both
caches after). The pass is checked on tiny Llama (rope only) and Qwen3
(q/k norm) checkpoints: fused and unfused plans agree bit for bit on cpu,
and within bf16 rounding for sm90 plans under the interpreter.
"""

from __future__ import annotations

import copy

import pytest
import torch

import rdnac
from rdnac.compiler.frontend import build_graph, read_checkpoint
from rdnac.compiler.passes import PassContext, fuse_qk_norm_rope_cache, fuse_rope_attention, merge_linears
from rdnac.ir import interpreter, ops
from rdnac.ir.verify import verify
from rdnac.kernels import attention as attn
from rdnac.kernels import attention_rope, qk_norm_rope_cache
from rdnac.kernels.gemm import split_k_counters
from rdnac.kernels.launch import InterpretLauncher, JitLauncher, RecordingLauncher
from tests.support.checkpoints import make_checkpoint
from tests.test_kernels_attention import make_batch

PASS = "fuse_rope_attention"
IDS = [1, 2, 3, 4, 5, 6, 7, 9, 11]
# Contexts (new token included) on and off multiples of BLOCK_N and of the cache block size (16).
CONTEXTS = [1, 15, 16, 17, 40, 64, 100]
SHAPES = {  # (Hq, Hk, D, rotary_dim, qk_norm, style)
    "qwen3": (8, 2, 128, 128, True, "neox"),  # GROUP 4 with q/k norm
    "llama": (8, 2, 64, 64, False, "neox"),  # rope only
    "smollm2": (9, 3, 64, 64, False, "neox"),  # GROUP 3, head_dim 64
    "gptj_partial": (4, 2, 64, 32, True, "gptj"),  # interleaved pairs, partial rotary
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so NaN sentinels compare equal to themselves."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _decode_inputs(shape: str, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """A decode batch over CONTEXTS plus one padded row (slot -1, seq_len 1, position 0), raw q/k/v as column
    views of one qkv output. Each new token's cache slot holds NaN: reading it before the write shows."""
    num_heads, num_kv_heads, head_dim, rotary_dim, qk_norm, style = SHAPES[shape]
    batch, _ = make_batch([(c, 1) for c in CONTEXTS], num_heads, num_kv_heads, head_dim, dtype, num_padded=1,
                          seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    num_seqs = len(CONTEXTS) + 1
    qkv = (torch.randn(num_seqs, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen) * 2).to(dtype)
    q, k, v = torch.split(qkv, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], 1)
    positions, block_size = batch["positions"], batch["k_cache"].shape[1]
    rows = torch.arange(num_seqs)
    slots = batch["block_tables"][rows, positions // block_size].long() * block_size + positions % block_size
    slots[-1] = -1  # the padded row
    for cache in (batch["k_cache"], batch["v_cache"]):
        cache.view(-1, num_kv_heads, head_dim)[slots[:-1]] = float("nan")
    norms = [(torch.randn(head_dim, generator=gen) * 0.1 + 1).to(dtype) for _ in range(2)] if qk_norm else []
    attrs = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, rotary_dim=rotary_dim,
                 theta=1e6, style=style, scaling=None, qk_norm=qk_norm, eps=1e-6, unit_offset=False,
                 scale=head_dim ** -0.5)
    inputs = dict(q=q, k=k, v=v, positions=positions, slot_mapping=slots, k_cache=batch["k_cache"],
                  v_cache=batch["v_cache"], block_tables=batch["block_tables"], seq_lens=batch["seq_lens"],
                  cu_seqlens_q=batch["cu_seqlens_q"])
    return {name: t.to(device) for name, t in inputs.items()}, [w.to(device) for w in norms], \
        batch["sinks"].to(device), attrs


def _fused_vs_unfused(inputs, norms, sinks, attrs, config, launcher, *, exact=True):
    """Runs the fused kernel, the unfused pair and (on cpu) the reference; asserts the fused one gives the
    pair's output and caches (bit for bit with `exact`), and the reference's within bf16/fp32 tolerance."""
    rope_keys = ("num_heads", "num_kv_heads", "head_dim", "rotary_dim", "theta", "style", "scaling", "qk_norm",
                 "eps", "unit_offset")
    rope_attrs = {key: attrs[key] for key in rope_keys}
    attn_attrs = {key: attrs[key] for key in ("num_heads", "num_kv_heads", "head_dim", "scale", "sliding_window",
                                              "softcap") if key in attrs}
    inv_freq, scaling = ops.rope_inv_freq(attrs["rotary_dim"], attrs["theta"], attrs["scaling"])
    inv_freq = inv_freq.to(inputs["q"].device)
    raw = [inputs[n] for n in ("q", "k", "v", "positions", "slot_mapping")]
    meta = [inputs[n] for n in ("block_tables", "seq_lens", "cu_seqlens_q")]
    caches = {who: (inputs["k_cache"].clone(), inputs["v_cache"].clone()) for who in ("fused", "unfused", "ref")}
    extra = [sinks] if sinks is not None else []

    out = attention_rope.rope_cache_attention_decode(*raw, *caches["fused"], *meta, *norms, *extra, **attrs,
                                                     inv_freq=inv_freq, attention_scaling=scaling, config=config,
                                                     launcher=launcher)
    heads = {k: attrs[k] for k in ("head_dim", "num_heads", "num_kv_heads")}
    q_rot = qk_norm_rope_cache.qk_norm_rope_cache(
        *raw, *caches["unfused"], *norms, **rope_attrs, inv_freq=inv_freq, attention_scaling=scaling,
        config=qk_norm_rope_cache.default_config({**heads, "M": raw[0].shape[0]}), launcher=launcher)
    expected = attn.attention_decode(q_rot, *caches["unfused"], *meta, inputs["positions"], sinks, **attn_attrs,
                                     config=config, launcher=launcher)
    name = f"{attrs} {config['constexprs']}"
    assert out.shape == expected.shape and out.dtype == expected.dtype, name
    assert torch.isfinite(out[:-1]).all(), f"{name}: non-finite output (a NaN slot was read before its write)"
    if exact:
        assert torch.equal(_bits(out), _bits(expected)), \
            f"{name}: output differs from the unfused pair, max {(out.float() - expected.float()).abs().max()}"
        for i, what in enumerate(("k_cache", "v_cache")):
            assert torch.equal(_bits(caches["fused"][i]), _bits(caches["unfused"][i])), f"{name}: {what} differs"
    else:
        diff = (out.float() - expected.float()).abs().max().item()
        assert diff <= 2e-2 * max(1.0, expected.float().abs().max().item()), f"{name}: max diff {diff}"
    if out.device.type == "cpu":
        ref = ops.rope_cache_attention(*raw, *caches["ref"], *meta, *norms, *extra, **attrs)
        # bf16: the reference's cos/sin (torch) may differ from tl.cos/tl.sin by an ulp before rounding, which
        # moves a q' element by one bf16 ulp; peaked softmax weights amplify that. The bits are checked above.
        atol, rtol = (2e-5, 2e-5) if out.dtype == torch.float32 else (0.25, 0.05)
        err = (out.float() - ref.float()).abs().max().item()
        assert torch.allclose(out.float(), ref.float(), atol=atol, rtol=rtol), f"{name}: vs reference {err:.3g}"
    return out, expected


# (NUM_SPLITS, BLOCK_N, SELF_REDUCE): every value of each once, and the pairs that matter (16 splits with
# 16-key tiles: most splits empty; 1 split: in-place normalize).
CONFIGS = [(1, 16, False), (1, 64, False), (4, 32, False), (4, 32, True), (16, 16, False), (16, 64, True)]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_kernel_bit_identical_to_unfused_pair(shape, dtype):
    inputs, norms, _, attrs = _decode_inputs(shape, dtype)
    launcher = InterpretLauncher()
    configs = CONFIGS if dtype == torch.bfloat16 and shape in ("qwen3", "smollm2") else CONFIGS[2:4]
    for num_splits, block_n, self_reduce in configs:
        config = attn._config(4, 2, NUM_SPLITS=num_splits, BLOCK_N=block_n, SELF_REDUCE=self_reduce)
        _fused_vs_unfused(inputs, norms, None, attrs, config, launcher)
        assert not split_k_counters(inputs["q"].device, 1).any(), "arrival counters left non-zero"


@pytest.mark.parametrize("options", [dict(sliding_window=8), dict(sliding_window=20, softcap=3.0), dict(softcap=2.0)],
                         ids=["window", "window_softcap", "softcap"])
@pytest.mark.parametrize("use_sinks", [False, True])
def test_decode_kernel_window_softcap_sinks(options, use_sinks):
    inputs, norms, sinks, attrs = _decode_inputs("smollm2", torch.bfloat16, seed=3)
    attrs = {**attrs, **options}
    launcher = InterpretLauncher()
    for num_splits, block_n, self_reduce in ((1, 16, False), (4, 16, False), (4, 32, True)):
        config = attn._config(4, 2, NUM_SPLITS=num_splits, BLOCK_N=block_n, SELF_REDUCE=self_reduce)
        _fused_vs_unfused(inputs, norms, sinks if use_sinks else None, attrs, config, launcher)


def test_decode_padded_row_writes_nothing():
    """Slot -1 (a padded graph row): no cache slot changes but the real rows' new ones."""
    inputs, norms, _, attrs = _decode_inputs("qwen3", torch.bfloat16, seed=4)
    before = _bits(inputs["k_cache"].clone()), _bits(inputs["v_cache"].clone())
    inv_freq, scaling = ops.rope_inv_freq(attrs["rotary_dim"], attrs["theta"], None)
    names = ("q", "k", "v", "positions", "slot_mapping", "k_cache", "v_cache", "block_tables", "seq_lens",
             "cu_seqlens_q")
    attention_rope.rope_cache_attention_decode(*(inputs[n] for n in names), *norms, **attrs, inv_freq=inv_freq,
                                               attention_scaling=scaling,
                                               config=attn._config(4, 2, NUM_SPLITS=4, BLOCK_N=16),
                                               launcher=InterpretLauncher())
    num_kv_heads, head_dim = attrs["num_kv_heads"], attrs["head_dim"]
    written = torch.zeros(inputs["k_cache"].shape[:2], dtype=torch.bool).flatten()
    written[inputs["slot_mapping"][:-1]] = True
    for cache, old in zip((inputs["k_cache"], inputs["v_cache"]), before):
        changed = (_bits(cache) != old).reshape(-1, num_kv_heads * head_dim).any(1)
        assert torch.equal(changed, written), "slots other than the real rows' new ones were written"


def test_wrapper_records_one_launch_and_checks_its_inputs():
    """Meta tensors (no host reads: graph capture safe); one launch with SELF_REDUCE or one split, the reduce
    kernel after it otherwise; bad inputs fail with messages naming the tensor."""
    inputs, norms, _, attrs = _decode_inputs("qwen3", torch.bfloat16)
    meta = {n: t.to("meta") for n, t in inputs.items()}
    qkv = torch.empty(len(CONTEXTS) + 1, 12 * 128, dtype=torch.bfloat16, device="meta")
    meta["q"], meta["k"], meta["v"] = torch.split(qkv, [8 * 128, 2 * 128, 2 * 128], 1)
    norms = [w.to("meta") for w in norms]
    kw = dict(**attrs, inv_freq=torch.empty(64, device="meta"), attention_scaling=1.0)
    names = ("q", "k", "v", "positions", "slot_mapping", "k_cache", "v_cache", "block_tables", "seq_lens",
             "cu_seqlens_q")
    split = attn._config(4, 2, NUM_SPLITS=8, BLOCK_N=32)
    for config, kernels in ((split, ["_rope_decode_kernel", "_decode_reduce_kernel"]),
                            (attn._config(4, 2, NUM_SPLITS=8, BLOCK_N=32, SELF_REDUCE=True), ["_rope_decode_kernel"]),
                            (attn._config(4, 2, NUM_SPLITS=1, BLOCK_N=32), ["_rope_decode_kernel"])):
        rec = RecordingLauncher(pdl=True)
        out = attention_rope.rope_cache_attention_decode(*(meta[n] for n in names), *norms, **kw, config=config,
                                                         launcher=rec)
        assert out.shape == (len(CONTEXTS) + 1, 8 * 128) and out.device.type == "meta"
        assert [c.kernel.split(":")[1] for c in rec.calls] == kernels
        assert rec.calls[0].constexprs["PDL"] is True and "stride_qt" in rec.calls[0].divisible
    bad = dict(meta, k_cache=torch.empty(4, 16, 2, 64, dtype=torch.bfloat16, device="meta"))
    with pytest.raises(AssertionError, match="caches must be"):
        attention_rope.rope_cache_attention_decode(*(bad[n] for n in names), *norms, **kw, config=split,
                                                   launcher=RecordingLauncher())
    with pytest.raises(AssertionError, match="norm weights"):
        attention_rope.rope_cache_attention_decode(*(meta[n] for n in names), **kw, config=split,
                                                   launcher=RecordingLauncher())


# ------------------------------------------------------------ pass


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused_rope_attention")
    for family in ("llama", "qwen3"):
        make_checkpoint(family, root / family, with_tokenizer=True)
    return root


def _step_inputs(graph, num_tokens: int) -> dict[str, torch.Tensor]:
    from rdnac.cli.verify import step_inputs

    return step_inputs(graph, IDS[:num_tokens], 16)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_pass_fuses_and_matches_interpreter(family, checkpoints):
    graph, weights, _ = build_graph(read_checkpoint(checkpoints / family), "float32")
    ctx = PassContext(target="cpu")
    graph = fuse_qk_norm_rope_cache.run(merge_linears.run(graph, ctx, weights), ctx)
    original = copy.deepcopy(graph)
    fused = fuse_rope_attention.run(graph, ctx)
    verify(fused)
    layers = fused.attrs["num_layers"]
    counts = fused.op_counts()
    assert counts["rope_cache_attention"] == layers and not {"attention", "qk_norm_rope_cache"} & set(counts)
    for i in range(layers):
        node = fused.node(f"layers.{i}.rope_cache_attention")
        assert node.outputs == original.node(f"layers.{i}.attn").outputs
        assert node.attrs["qk_norm"] is (family == "qwen3") and "scale" in node.attrs
        assert len(node.inputs) == (12 if family == "qwen3" else 10)
    decisions = [d for d in ctx.decisions if d["pass"] == PASS]
    assert len(decisions) == layers and all(d["action"].startswith("fused") for d in decisions)
    ref_inputs, inputs = _step_inputs(original, len(IDS)), _step_inputs(fused, len(IDS))
    ref = interpreter.run(original, weights, ref_inputs)["logits"]
    assert torch.equal(interpreter.run(fused, weights, inputs)["logits"], ref)
    for name in (n for n in inputs if n.startswith(("k_cache", "v_cache"))):
        assert torch.equal(inputs[name], ref_inputs[name]), name


def test_pass_logs_why_it_cannot_fuse(checkpoints):
    graph, weights, _ = build_graph(read_checkpoint(checkpoints / "qwen3"), "float32")
    ctx = PassContext(target="cpu")
    graph = fuse_qk_norm_rope_cache.run(graph, ctx)
    graph.outputs.append("layers.0.rope.0")  # layer 0's q' is needed outside: it stays separate
    fused = fuse_rope_attention.run(graph, ctx)
    verify(fused)
    decisions = {d["node"]: d for d in ctx.decisions if d["pass"] == PASS}
    assert decisions["layers.0.qk_norm_rope_cache"]["action"] == "kept separate"
    assert "graph output" in decisions["layers.0.qk_norm_rope_cache"]["reason"]
    assert decisions["layers.1.rope_cache_attention"]["action"].startswith("fused")
    assert [n.op for n in fused.nodes].count("attention") == 1


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cpu_plan_fused_is_bit_identical_and_disable_pass_restores(family, checkpoints, tmp_path):
    ckpt = checkpoints / family
    on = rdnac.load(rdnac.compile(ckpt, output=tmp_path / "on.msgpack"))
    off = rdnac.load(rdnac.compile(ckpt, output=tmp_path / "off.msgpack", disable_passes=(PASS,)))
    layers = on.graph.attrs["num_layers"]
    assert on.graph.op_counts()["rope_cache_attention"] == layers
    assert off.graph.op_counts()["attention"] == layers and "rope_cache_attention" not in off.graph.op_counts()
    skipped = [d for d in off.plan.body["decisions"] if d["pass"] == PASS]
    assert skipped == [{"pass": PASS, "node": "-", "action": "skipped", "reason": "disabled with --disable-pass"}]
    assert torch.equal(on.logits(IDS), off.logits(IDS))


def test_sm90_plan_fused_vs_unfused_under_interpreter(checkpoints, tmp_path):
    opts = dict(quiet=True, max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16)
    ckpt = checkpoints / "qwen3"
    on = rdnac.load(rdnac.compile(ckpt, "sm90", tmp_path / "on.msgpack", **opts), interpret=True)
    off = rdnac.load(rdnac.compile(ckpt, "sm90", tmp_path / "off.msgpack", disable_passes=(PASS,), **opts),
                     interpret=True)
    program = on.plan.body["program"]
    fused_nodes = [n.name for n in on.graph.nodes if n.op == "rope_cache_attention"]
    assert len(fused_nodes) == 2
    kernels = {key.split(":")[0]: choice["kernel"] for n in fused_nodes for key, choice in program[n].items()}
    assert kernels == {"decode": "attention_rope.rope_cache_attention_decode",
                       "prefill": "attention_rope.rope_cache_attention_prefill"}
    for n in fused_nodes:
        for key, choice in program[n].items():
            assert ("rope" in choice["config"]) == key.startswith("prefill"), (n, key)
    decisions = [d for d in on.plan.body["decisions"] if d["pass"] == "select_kernels" and d["node"] in fused_nodes]
    assert any("config['rope']" in d["reason"] for d in decisions)
    assert len(program) == len(off.plan.body["program"]) - 2  # the rope node of each layer is gone
    ours, ref = on.logits(IDS).float(), off.logits(IDS).float()
    diff = (ours - ref).abs().max().item()
    print(f"\nsm90 bf16 under the interpreter: fused vs unfused logits max abs diff {diff:.3g}")
    assert diff <= 1e-2 * ref.abs().max().item()
    prompts = [IDS, IDS[:4]]  # decode steps run the fused kernel
    assert [c.token_ids for c in on.generate(prompts, max_tokens=3)] == \
        [c.token_ids for c in off.generate(prompts, max_tokens=3)]


# ------------------------------------------------------------ on the GPU

has_cuda = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda, reason="needs a CUDA/HIP GPU")
@pytest.mark.parametrize("shape", ["qwen3", "llama", "smollm2"])
def test_gpu_fused_decode_matches_unfused_pair(shape):
    """JIT on the GPU, bf16: without q/k norm bit for bit; with it within bf16 rounding, since the GPU's
    reduction order for the norm's sum of squares follows each kernel's tile layout (the number of
    differing elements is printed)."""
    inputs, norms, sinks, attrs = _decode_inputs(shape, torch.bfloat16, device="cuda")
    launcher = JitLauncher()
    exact = not attrs["qk_norm"]
    for num_splits, block_n, self_reduce in [*CONFIGS, (8, 32, True)]:
        config = attn._config(4, 2, NUM_SPLITS=num_splits, BLOCK_N=block_n, SELF_REDUCE=self_reduce)
        out, expected = _fused_vs_unfused(inputs, norms, None, attrs, config, launcher, exact=exact)
        print(f"\n{shape} {config['constexprs']}: {(_bits(out) != _bits(expected)).sum().item()} of "
              f"{out.numel()} output elements differ from the unfused pair")
    _fused_vs_unfused(inputs, norms, sinks, {**attrs, "sliding_window": 20, "softcap": 3.0},
                      attn._config(4, 2, NUM_SPLITS=4, BLOCK_N=16), launcher, exact=exact)


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda, reason="needs a CUDA/HIP GPU")
def test_gpu_fused_decode_in_a_replayed_graph_with_pdl(tmp_path):
    """The plan's form: AOT binaries, PDL on, captured in a CUDA graph behind the GEMM that produces q/k/v
    (so the loads issued before the PDL wait race with a running predecessor). 20 replays with new
    activations: output and caches equal, bit for bit, the same graph built without PDL; an ordering
    race (a K/V or q load that should have waited) would show as other bits."""
    from rdnac.compiler.build import compile_calls
    from rdnac.kernels import gemm
    from rdnac.runtime.aot import AotLauncher, device_arch

    arch, _ = device_arch(0)
    inputs, norms, _, attrs = _decode_inputs("qwen3", torch.bfloat16, device="cuda")
    num_seqs, hidden = inputs["q"].shape[0], 1024
    width = (attrs["num_heads"] + 2 * attrs["num_kv_heads"]) * attrs["head_dim"]
    g = torch.Generator(device="cuda").manual_seed(5)
    w_qkv = (torch.randn(width, hidden, device="cuda", generator=g) / hidden ** 0.5).bfloat16()  # [N, K]
    inv_freq, scaling = ops.rope_inv_freq(attrs["rotary_dim"], attrs["theta"], None)
    names = ("positions", "slot_mapping", "k_cache", "v_cache", "block_tables", "seq_lens", "cu_seqlens_q")
    gemm_cfg = {"constexprs": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_SIZE_M": 1, "SPLIT_K": 1},
                "num_warps": 4, "num_stages": 3}
    sizes = [attrs["num_heads"] * attrs["head_dim"], attrs["num_kv_heads"] * attrs["head_dim"],
             attrs["num_kv_heads"] * attrs["head_dim"]]

    def step(x, env, config, launcher):  # x [B, hidden] -> qkv GEMM -> fused decode attention
        q, k, v = torch.split(gemm.linear(x, env["w"], config=gemm_cfg, launcher=launcher), sizes, 1)
        return attention_rope.rope_cache_attention_decode(
            q, k, v, *(env[n] for n in names[:2]), env["k_cache"], env["v_cache"], *(env[n] for n in names[4:]),
            *env["norms"], **attrs, inv_freq=env["inv_freq"], attention_scaling=scaling, config=config,
            launcher=launcher)

    for self_reduce in (False, True):
        config = attn._config(4, 2, NUM_SPLITS=16, BLOCK_N=32, SELF_REDUCE=self_reduce)
        x = torch.randn(num_seqs, hidden, device="cuda", generator=g).bfloat16()
        outs, graphs, envs = {}, {}, {}
        for pdl in (False, True):
            meta_env = {n: inputs[n].to("meta") for n in names}
            meta_env.update(w=w_qkv.to("meta"), norms=[w.to("meta") for w in norms],
                            inv_freq=inv_freq.to("meta"))
            rec = RecordingLauncher(pdl=pdl)
            step(x.to("meta"), meta_env, config, rec)
            bins = [b.to_dict() for b in compile_calls(rec.calls, arch, quiet=True,
                                                       cache_dir=tmp_path / f"{self_reduce}{pdl}")]
            launcher = AotLauncher(bins, "cuda", pdl=pdl)
            envs[pdl] = env = {n: inputs[n].clone() for n in names}
            env.update(w=w_qkv, norms=norms, inv_freq=inv_freq.cuda())
            step(x, dict(env, k_cache=env["k_cache"].clone(), v_cache=env["v_cache"].clone()), config, launcher)
            torch.cuda.synchronize()
            graphs[pdl] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[pdl]):
                outs[pdl] = step(x, env, config, launcher)
        for _ in range(20):
            x.copy_(torch.randn(num_seqs, hidden, device="cuda", generator=g).bfloat16())
            for pdl in (False, True):
                graphs[pdl].replay()
            torch.cuda.synchronize()
            assert torch.isfinite(outs[True][:-1]).all(), "a NaN cache slot was read"
            assert torch.equal(_bits(outs[True]), _bits(outs[False])), f"{config}: PDL changed the output"
            for cache in ("k_cache", "v_cache"):
                assert torch.equal(_bits(envs[True][cache]), _bits(envs[False][cache])), f"{config}: {cache}"
        assert not split_k_counters(x.device, 1).any(), "arrival counters left non-zero"

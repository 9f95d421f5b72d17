"""The Gated DeltaNet kernel families against their IR references (rdnac.ir.linear_attention).

causal_conv1d (prefill and decode), gated_delta_rule (chunked prefill, recurrent decode), gated_rms_norm,
sigmoid_gate: under the Triton interpreter at tiny odd sizes, over ragged batches that mix a chunk starting
its sequence on a slot holding a stale state, chunks continuing their sequence (a prompt split across
prefill steps mid-GDN-block), single tokens, and padding rows on slot -1. Each check asserts shape, dtype,
then closeness of the output and of the whole state tensor (untouched slots included). Then a tiny Qwen3.5
GPU plan: cross-compiled for every target within its limits, and (gpu) run on cuda with graphs against
the same plan under the interpreter.
"""

from __future__ import annotations

import pytest
import torch

import rdnac
from rdnac import SamplingParams
from rdnac.compiler.build import check_resources
from rdnac.ir import linear_attention as la
from rdnac.kernels import conv1d, gated_delta, gated_rms_norm, registry, sigmoid_gate
from rdnac.plans import read_plan
from rdnac.plans.binaries import KernelBinary
from tests.support.checkpoints import make_checkpoint, reference_greedy
from tests.test_kernels_small import CPU, assert_close

TARGETS = ("gfx1201", "gfx1151", "gfx942", "gfx950", "sm90")
GDN = dict(num_k_heads=2, num_v_heads=4, k_head_dim=12, v_head_dim=10)  # GQA 2:1 value heads, odd dims


def _tol(dtype: torch.dtype) -> tuple[float, float]:
    # float32: summation order only. bf16: the kernels' 16-bit dot operands and one bf16 rounding of the output
    return (2e-5, 2e-5) if dtype == torch.float32 else (3e-2, 3e-2)


def _batch(chunks: list[tuple[int, int, int]]):
    """(state_slots, seq_lens, cu_seqlens_q) for chunks of (length, seq_len after the chunk, slot)."""
    lengths = [c[0] for c in chunks]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return (torch.tensor([c[2] for c in chunks], dtype=torch.int64),
            torch.tensor([c[1] for c in chunks], dtype=torch.int32), cu)


# A prefill step: a chunk continuing its sequence past one kernel block (37 tokens after 9), a chunk that starts
# its sequence on a slot holding another sequence's stale state (70 tokens: a full 64-token block and a tail), a
# single token continuing its sequence, a chunk shorter than the conv's state continuing its sequence, and a
# padding row on slot -1 (reads zeros, writes nothing).
PREFILL = [(37, 46, 2), (70, 70, 0), (1, 20, 1), (2, 9, 4), (3, 7, -1)]
NUM_SLOTS = 6  # slot 3 and 5: nobody's, must stay as they are
# A decode step: continuing sequences, a one-token prompt (its position 0: reads zeros), a padding row.
DECODE = [(1, 47, 2), (1, 1, 0), (1, 21, 1), (1, 2, -1), (1, 10, 4)]


# ------------------------------------------------------------ causal_conv1d


def _check_conv(dtype, chunks, config, kernel_size, channels=40):
    slots, seq_lens, cu = _batch(chunks)
    num_tokens = int(cu[-1])
    g = torch.Generator().manual_seed(kernel_size)
    x = torch.randn(num_tokens, channels, generator=g).to(dtype)
    weight = (torch.randn(channels, kernel_size, generator=g) * 0.5).to(dtype)
    state = torch.randn(NUM_SLOTS, channels, kernel_size - 1, generator=g).to(dtype)
    ref_state = state.clone()
    ref = la.causal_conv1d(x, weight, ref_state, slots, seq_lens, cu, kernel_size=kernel_size)
    if all(c[0] == 1 for c in chunks):
        out = conv1d.causal_conv1d_decode(x, weight, state, slots, seq_lens, cu, kernel_size=kernel_size,
                                          config=config, launcher=CPU)
    else:
        out = conv1d.causal_conv1d_prefill(x, weight, state, slots, seq_lens, cu, kernel_size=kernel_size,
                                           max_query_len=max(c[0] for c in chunks), config=config, launcher=CPU)
    name = f"causal_conv1d K={kernel_size} {config['constexprs']}"
    assert_close(name, out, ref, *_tol(dtype))
    assert_close(name + " state", state, ref_state, 0.0, 0.0)  # copied inputs: bit-exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel_size", [4, 2])
def test_causal_conv1d_prefill(dtype, kernel_size):
    problem = {"phase": "prefill", "channels": 40, "kernel_size": kernel_size}
    space = conv1d.config_space(problem)
    assert conv1d.default_config(problem) in space
    # the default, and small tiles: several channel tiles and several token tiles per chunk
    small = {"constexprs": {"BLOCK_T": 16, "BLOCK_C": 32}, "num_warps": 2, "num_stages": 1}
    assert small in space
    for config in (conv1d.default_config(problem), small):
        _check_conv(dtype, PREFILL, config, kernel_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv1d_decode(dtype):
    problem = {"phase": "decode", "channels": 40, "kernel_size": 4}
    config = conv1d.default_config(problem)
    assert config in conv1d.config_space(problem) and config["constexprs"]["BLOCK_T"] == 1
    _check_conv(dtype, DECODE, config, 4)


# ------------------------------------------------------------ gated_delta_rule


def _gdn_inputs(num_tokens: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    hk, hv, dk, dv = GDN["num_k_heads"], GDN["num_v_heads"], GDN["k_head_dim"], GDN["v_head_dim"]
    # q, k, v as column views of one conv output, as the graph's split feeds them
    qkv = torch.randn(num_tokens, 2 * hk * dk + hv * dv, generator=g).to(dtype)
    q, k, v = qkv.split([hk * dk, hk * dk, hv * dv], dim=1)
    a = torch.randn(num_tokens, hv, generator=g).to(dtype)
    b = torch.randn(num_tokens, hv, generator=g).to(dtype)
    A_log = (torch.rand(hv, generator=g) * 2 - 1).to(dtype)
    dt_bias = torch.randn(hv, generator=g).to(dtype)
    return q, k, v, a, b, A_log, dt_bias


def _state(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(NUM_SLOTS, GDN["num_v_heads"], GDN["k_head_dim"], GDN["v_head_dim"], generator=g) * 0.5


def _run_gdn(inputs, state, chunks, config):
    slots, seq_lens, cu = _batch(chunks)
    if all(c[0] == 1 for c in chunks):
        return gated_delta.gated_delta_rule_decode(*inputs, state, slots, seq_lens, cu, **GDN, config=config,
                                                   launcher=CPU)
    return gated_delta.gated_delta_rule_prefill(*inputs, state, slots, seq_lens, cu, **GDN,
                                                max_query_len=max(c[0] for c in chunks), config=config, launcher=CPU)


def _check_gdn(dtype, chunks, config, seed=0):
    slots, seq_lens, cu = _batch(chunks)
    inputs = _gdn_inputs(int(cu[-1]), dtype, seed)
    state, ref_state = _state(seed), _state(seed)
    ref = la.gated_delta_rule(*inputs, ref_state, slots, seq_lens, cu, **GDN)
    out = _run_gdn(inputs, state, chunks, config)
    name = f"gated_delta_rule {dtype} {config['constexprs']} warps={config['num_warps']}"
    assert_close(name, out, ref, *_tol(dtype))
    assert_close(name + " state", state, ref_state, *_tol(dtype))  # float32, from 16-bit dot operands


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_delta_rule_prefill(dtype):
    problem = {"phase": "prefill", "v_head_dim": GDN["v_head_dim"], "chunk_size": 64}
    space = gated_delta.config_space(problem)
    default = gated_delta.default_config(problem)
    assert default in space and default["constexprs"]["CHUNK"] == 64  # the reference's block first
    smaller = next(c for c in space if c["constexprs"]["CHUNK"] == 16)
    for config in (default, smaller):
        _check_gdn(dtype, PREFILL, config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_delta_rule_decode(dtype):
    problem = {"phase": "decode", "v_head_dim": GDN["v_head_dim"]}
    default = gated_delta.default_config(problem)
    assert default in gated_delta.config_space(problem)
    _check_gdn(dtype, DECODE, default, seed=1)


def test_gated_delta_rule_prompt_split_across_prefill_steps():
    """One 100-token prompt prefilled in one step, and in three (40, 30, 30: the first two end mid-block),
    then decoded for two tokens: the kernels carry the state through the slot, whose stale content a new
    sequence never reads; the outputs and the final state agree with the reference run in one go."""
    prefill = {"phase": "prefill", "v_head_dim": GDN["v_head_dim"], "chunk_size": 64}
    prefill_cfg = gated_delta.default_config(prefill)
    decode_cfg = gated_delta.default_config({"phase": "decode", "v_head_dim": GDN["v_head_dim"]})
    total = 102
    inputs = _gdn_inputs(total, torch.float32, seed=3)
    ref_state = _state(7)
    slots, seq_lens, cu = _batch([(100, 100, 3)])
    ref = [la.gated_delta_rule(*(t[:100] for t in inputs[:5]), *inputs[5:], ref_state, slots, seq_lens, cu, **GDN)]
    for pos in (100, 101):  # the reference's own decode steps
        slots, seq_lens, cu = _batch([(1, pos + 1, 3)])
        ref.append(la.gated_delta_rule(*(t[pos:pos + 1] for t in inputs[:5]), *inputs[5:], ref_state, slots,
                                       seq_lens, cu, **GDN))
    ref = torch.cat(ref)

    state = _state(8)  # slot 3 holds another sequence's state: the first step must not read it
    outs = []
    for start, end in ((0, 40), (40, 70), (70, 100), (100, 101), (101, 102)):
        step = tuple(t[start:end] for t in inputs[:5]) + inputs[5:]
        chunk = [(end - start, end, 3)]
        outs.append(_run_gdn(step, state, chunk, prefill_cfg if end - start > 1 else decode_cfg))
    assert_close("gated_delta_rule split prompt", torch.cat(outs), ref, *_tol(torch.float32))
    assert_close("gated_delta_rule split prompt state", state[3], ref_state[3], *_tol(torch.float32))


# ------------------------------------------------------------ gated_rms_norm, sigmoid_gate


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.bfloat16, torch.float32)])
def test_gated_rms_norm(dtype, weight_dtype):
    num_heads, head_dim = 5, 10
    problem = {"num_heads": num_heads, "head_dim": head_dim}
    space = gated_rms_norm.config_space(problem)
    assert gated_rms_norm.default_config(problem) in space
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(7, num_heads * head_dim, generator=g) * 3).to(dtype)
    zg = torch.randn(7, 2 * num_heads * head_dim, generator=g).to(dtype)
    gate = zg[:, num_heads * head_dim:]  # strided rows
    weight = (torch.randn(head_dim, generator=g) * 0.1 + 1).to(weight_dtype)
    for config in (space[0], space[-1]):
        for act in ("silu", "none"):
            kw = dict(num_heads=num_heads, head_dim=head_dim, eps=1e-6, act=act)
            out = gated_rms_norm.gated_rms_norm(x, gate, weight, **kw, config=config, launcher=CPU)
            ref = la.gated_rms_norm(x, gate, weight, **kw)
            tol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 1.6e-2)
            assert_close(f"gated_rms_norm {act} {config['constexprs']}", out, ref, *tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sigmoid_gate(dtype):
    g = torch.Generator().manual_seed(5)
    qg = torch.randn(7, 2 * 48, generator=g).to(dtype)
    x, gate = torch.randn(7, 48, generator=g).to(dtype), qg[:, 48:]  # the attention gate: strided rows
    per_token = torch.randn(7, 1, generator=g).to(dtype)  # the shared expert's gate
    tol = (1e-6, 1e-6) if dtype == torch.float32 else (8e-3, 8e-3)
    for gt in (gate, per_token):
        problem = {"N": 48, "is_per_token": gt.shape[1] == 1}
        space = sigmoid_gate.config_space(problem)
        assert sigmoid_gate.default_config(problem) in space
        for config in (sigmoid_gate.default_config(problem), space[-1]):
            out = sigmoid_gate.sigmoid_gate(x, gt, config=config, launcher=CPU)
            assert_close(f"sigmoid_gate {tuple(gt.shape)}", out, la.sigmoid_gate(x, gt), *tol)


@pytest.mark.parametrize("rows", [1, 3])
def test_gate_columns_at_an_odd_offset_are_copied_to_an_aligned_allocation(rows):
    """The decay/beta gates are columns of a merged projection at an offset that is not a multiple of 16 bytes;
    AOT binaries assume aligned pointers. At decode batch 1 the one-row slice is contiguous already, so a
    `.contiguous()` would return the same misaligned view (the H100 failure of session 16's fix)."""
    from rdnac.kernels.launch import aligned

    merged = torch.randn(rows, 37, dtype=torch.bfloat16)
    gates = merged[:, 5:13]
    assert gates.data_ptr() % 16  # the case under test
    copied = aligned(gates)
    assert copied.data_ptr() % 16 == 0
    assert torch.equal(copied, gates)
    assert aligned(merged[:, 8:16]).data_ptr() == merged[:, 8:16].data_ptr()  # aligned views pass through


def test_the_ops_have_kernels():
    for op in la.OP_NAMES:
        assert registry.has_kernel(op) and op not in registry.REFERENCE_ONLY_OPS, op


# ------------------------------------------------------------ a tiny Qwen3.5 GPU plan


@pytest.fixture(scope="module")
def qwen3_5_dir(tmp_path_factory):
    from tests.test_qwen3_5 import CONFIG

    directory = tmp_path_factory.mktemp("qwen3_5_gpu") / "ckpt"
    make_checkpoint("qwen3_5_text", directory, **CONFIG)
    return directory


GDN_KERNELS = {"conv1d:_causal_conv1d_kernel", "gated_delta:_gdn_chunk_prepare_kernel",
               "gated_delta:_gdn_chunk_scan_kernel", "gated_delta:_gdn_decode_kernel",
               "gated_rms_norm:_gated_rms_norm_kernel", "sigmoid_gate:_sigmoid_gate_kernel"}


@pytest.mark.parametrize("target", TARGETS)
def test_tiny_qwen3_5_compiles_for_target(target, qwen3_5_dir, tmp_path):
    path = rdnac.compile(qwen3_5_dir, target=target, output=tmp_path / f"q35.{target}.msgpack", quiet=True)
    plan = read_plan(path)
    binaries = [KernelBinary.from_dict(k) for k in plan.body["kernels"]]
    for b in binaries:
        assert check_resources(b, target) == [], b.key
    built = {b.kernel.removeprefix("rdnac.kernels.") for b in binaries}
    assert GDN_KERNELS <= built, GDN_KERNELS - built
    nodes = {n["name"] for n in plan.body["graph"]["nodes"] if n["op"] != "split"}
    assert set(plan.body["program"]) == nodes
    gdn = plan.body["program"]["layers.0.gdn"]
    assert gdn["decode:1"]["kernel"] == "gated_delta.gated_delta_rule_decode"
    assert gdn["prefill:2048"]["kernel"] == "gated_delta.gated_delta_rule_prefill"


@pytest.fixture(scope="module")
def sm90_plan(qwen3_5_dir, tmp_path_factory):
    return rdnac.compile(qwen3_5_dir, target="sm90", output=tmp_path_factory.mktemp("q35") / "q35.msgpack",
                         quiet=True)


def test_tiny_qwen3_5_gpu_plan_under_the_interpreter_matches_transformers(qwen3_5_dir, sm90_plan):
    """The sm90 plan's own kernel specializations under the Triton interpreter: three prompts at once, the
    130-token one prefilled in 64-token steps beside the others' decodes, give transformers' greedy tokens."""
    from tests.test_qwen3_5 import PROMPT
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(qwen3_5_dir, dtype=torch.float32).eval()
    prompts = [PROMPT, PROMPT[:37], PROMPT[5:70]]
    llm = rdnac.load(sm90_plan, device="cpu", interpret=True, max_num_batched_tokens=64)
    ours = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True))]
    assert ours == [reference_greedy(model, p, 10) for p in prompts]


@pytest.mark.gpu
def test_tiny_qwen3_5_on_cuda_with_graphs_matches_the_interpreter(sm90_plan, no_compiler):
    """The sm90 plan on cuda (decode replayed from captured graphs, prefill over several steps) against the
    reference interpreter on the same plan graph and weights on cpu: the same greedy tokens. (Not the Triton
    interpreter: on the GPU machine (Triton 3.6) the interpreter fails in the GEMM with "only 0-dimensional
    arrays can be converted to Python scalars" at its `range` bound (H100, session 17); the
    cpu test above runs the kernels under the interpreter.)"""
    from rdnac.runtime.llm import LLM
    from rdnac.runtime.model_runner import ModelRunner
    from tests.test_qwen3_5 import PROMPT

    path = sm90_plan
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [PROMPT, PROMPT[:37], PROMPT[5:70]]
    gpu = rdnac.load(path, device="cuda", max_num_batched_tokens=64)  # the 130-token prompt in three steps
    assert gpu.runner.graphs is not None
    ours = [o.token_ids for o in gpu.generate(prompts, params)]
    reference = LLM(ModelRunner(gpu.plan, {k: t.cpu() for k, t in gpu.weights.items()}, "cpu"))
    assert ours == [o.token_ids for o in reference.generate(prompts, params)]

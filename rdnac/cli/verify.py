"""`rdnac verify PLAN --against MODEL`: run a plan and its unfused reference side by side, value by value.

The reference is MODEL compiled in a temporary directory for target cpu in
float32 with every optional graph pass disabled, run by the reference
interpreter. The plan runs as it would at run time: a cpu plan under the
interpreter, a GPU plan through its program (its own binaries on cuda, or its
kernels under the Triton interpreter). Both see the same tokens as one
prefill step; every value name present in both graphs (passes preserve
names: a fused norm keeps the add's output name) is compared in the plan's
graph order, and the first node whose error exceeds the tolerance is named.
Values only the plan has (the fp8 `y.fp8`/`y.fp8_scale` of a fused norm or
activation) are not compared; the linears reading them are.

The error of a value is max|plan - reference| / max|reference|: relative to
the value's scale, so one tolerance fits embeddings, residuals and logits.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rdnac.errors import RdnacError, RequestError
from rdnac.ir import interpreter
from rdnac.ir.graph import Graph
from rdnac.plans import Plan, read_plan

# Default tolerance per plan compute dtype: float32 plans match the reference to rounding;
# 16-bit plans round every activation (bf16 keeps 8 mantissa bits) and drift over layers.
DEFAULT_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
# A plan with quantized weights (fp8: 3 mantissa bits, so each quantized operand rounds by up to 2^-4) is
# compared with a float32 reference of the float checkpoint: ~0.09 at worst on tiny random models.
QUANTIZED_TOLERANCE = 0.15
DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog."
_TINY = 1e-12  # scale floor: an all-zero reference value compares by absolute error


@dataclass
class ValueCheck:
    """One compared value: the node producing it in the plan graph and how far it is from the reference."""
    node: str
    op: str
    value: str
    shape: tuple[int, ...]
    max_abs_error: float
    scale: float
    error: float  # max_abs_error / scale
    is_ok: bool
    note: str = ""

    def to_dict(self) -> dict:
        return {**self.__dict__, "shape": list(self.shape)}


@dataclass
class VerifyResult:
    plan: str
    reference: str
    num_tokens: int
    tolerance: float
    runner: str  # how the plan ran: "interpreter", "cuda", "triton-interpreter"
    rows: list[ValueCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def first_failure(self) -> ValueCheck | None:
        return next((r for r in self.rows if not r.is_ok), None)

    @property
    def is_ok(self) -> bool:
        return self.first_failure is None


# ---------------------------------------------------------------- comparison


def compare_values(graph: Graph, values: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                   tolerance: float) -> list[ValueCheck]:
    """Compare every value of `graph` present in both dicts, in graph order."""
    rows = []
    for node in graph.nodes:
        for name in node.outputs:
            if name not in values or name not in reference:
                continue
            a, b = values[name].detach().float().cpu(), reference[name].detach().float().cpu()
            if a.shape != b.shape:
                rows.append(ValueCheck(node.name, node.op, name, tuple(a.shape), math.inf, math.nan, math.inf, False,
                                        f"shape {tuple(a.shape)} vs reference {tuple(b.shape)}"))
                continue
            diff = (a - b).abs()
            max_abs = float(diff.max()) if diff.numel() else 0.0
            if not torch.isfinite(a).all():
                max_abs = math.inf  # NaN in the plan's value must not compare as "small"
            scale = float(b.abs().max()) if b.numel() else 0.0
            error = max_abs / max(scale, _TINY)
            rows.append(ValueCheck(node.name, node.op, name, tuple(a.shape), max_abs, scale, error,
                                    error <= tolerance))
    return rows


# ---------------------------------------------------------------- running both graphs


def step_inputs(graph: Graph, token_ids: list[int], block_size: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Inputs of one prefill step of one sequence holding `token_ids`, with its declared state freshly
    zeroed (paged state: just enough blocks; per-sequence state: one slot); logits for every position."""
    num_tokens = len(token_ids)
    num_blocks = -(-num_tokens // block_size)
    known = {
        "token_ids": torch.tensor(token_ids, dtype=torch.int64),
        "positions": torch.arange(num_tokens, dtype=torch.int64),
        "slot_mapping": torch.arange(num_tokens, dtype=torch.int64),  # blocks 0..NB-1 in order
        "block_tables": torch.arange(num_blocks, dtype=torch.int32)[None, :],
        "seq_lens": torch.tensor([num_tokens], dtype=torch.int32),
        "cu_seqlens_q": torch.tensor([0, num_tokens], dtype=torch.int32),
        "logits_indices": torch.arange(num_tokens, dtype=torch.int64),
        "state_slots": torch.zeros(1, dtype=torch.int64),
    }
    state = {s.name: s for s in graph.state}
    out = {}
    for name, spec in graph.inputs.items():
        if name in known:
            out[name] = known[name].to(device=device, dtype=getattr(torch, spec.dtype))
        elif name in state:
            declared = state[name]
            shape = (num_blocks, block_size, *declared.shape) if declared.is_paged else (1, *declared.shape)
            out[name] = torch.zeros(shape, dtype=getattr(torch, declared.dtype), device=device)
        else:
            raise RdnacError(f"graph input {name!r} ({spec.dtype} {list(spec.shape)}) is not one verify knows how "
                             "to fill; requires the inputs documented in rdnac/ir/graph.py")
    return out


def _all_values(graph: Graph) -> tuple[str, ...]:
    return tuple(name for node in graph.nodes for name in node.outputs)


def run_plan(plan: Plan, weights: dict[str, torch.Tensor], token_ids: list[int],
             interpret: bool | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Every value of one prefill step of `plan`, and how it ran."""
    graph = Graph.from_dict(plan.body["graph"])
    block_size = plan.body["runtime"]["kv_block_size"]
    program = plan.body.get("program") or {}
    with torch.inference_mode():
        if not program:
            inputs = step_inputs(graph, token_ids, block_size)
            return interpreter.run(graph, weights, inputs, keep=_all_values(graph)), "interpreter"
        from rdnac.runtime.executor import Executor, StepMeta

        limit = plan.body["runtime"].get("max_num_batched_tokens")
        if limit and len(token_ids) > limit:
            raise RequestError(f"verify requires at most the plan's max_num_batched_tokens ({limit}) tokens in its "
                               f"one prefill step; got {len(token_ids)}; use a shorter prompt")
        from rdnac.runtime.kernel_check import check_kernels

        check_kernels(plan.body, plan.header["target"], plan.path)  # as every load of a GPU plan does
        if interpret is None:
            interpret = not torch.cuda.is_available()
        if interpret:
            from rdnac.kernels.launch import InterpretLauncher

            device, launcher, runner = "cpu", InterpretLauncher(), "triton-interpreter"
        else:
            from rdnac.runtime.aot import AotLauncher, check_target

            if not torch.cuda.is_available():
                raise RequestError("running a GPU plan's binaries requires a CUDA/ROCm GPU visible to torch; none "
                                   "found; use --interpret")
            check_target(plan.header["target"], torch.device("cuda"))
            device, launcher, runner = "cuda", AotLauncher.for_plan(plan.body, "cuda"), "cuda"
        env = {**{k: v.to(device) for k, v in weights.items()}, **step_inputs(graph, token_ids, block_size, device)}
        Executor(graph, program, launcher, device).run(env, StepMeta("prefill", len(token_ids), len(token_ids)))
        if device == "cuda":
            torch.cuda.synchronize()
        return {name: env[name] for name in _all_values(graph) if name in env}, runner


def reference_passes_disabled() -> tuple[str, ...]:
    """Every graph pass but dead-code elimination: the reference is the frontend's graph as built."""
    from rdnac.compiler.pipeline import GRAPH_PASSES, LATE_PASSES

    return tuple(p for p in GRAPH_PASSES + LATE_PASSES if p != "dce")


def compile_reference(model: str | Path, directory: Path, max_model_len: int | None) -> Plan:
    from rdnac.compiler.pipeline import compile_model

    path = compile_model(model, "cpu", directory / "reference.msgpack", dtype="float32", max_model_len=max_model_len,
                         disable_passes=reference_passes_disabled(), quiet=True)
    return read_plan(path)


def encode(plan: Plan, prompt: str | None, token_ids: list[int] | None) -> list[int]:
    vocab_size = Graph.from_dict(plan.body["graph"]).attrs["vocab_size"]
    if token_ids is None:
        from rdnac.runtime.tokenizer import Tokenizer

        tok = plan.body["tokenizer"]
        tokenizer = Tokenizer(tok["json"], tok["config"], plan.body.get("chat_template"),
                              plan.body.get("generation_config") or {})
        token_ids = tokenizer.encode(prompt if prompt is not None else DEFAULT_PROMPT)
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if not token_ids or bad:
        raise RequestError(f"verify requires at least one token id, each 0 <= id < {vocab_size}; got "
                           f"{bad[:5] if bad else 'none'}")
    return list(token_ids)


def verify_plan(plan_path: str | Path, model: str | Path, *, prompt: str | None = None,
                token_ids: list[int] | None = None, tolerance: float | None = None,
                interpret: bool | None = None) -> VerifyResult:
    plan = read_plan(plan_path)
    if plan.num_ranks > 1:
        raise RdnacError(f"{plan.path}: rdnac verify requires a plan of one rank (it compares every node's values, "
                         f"and a rank holds a slice of them); got a --tp {plan.num_ranks} plan; verify the model's "
                         "--tp 1 plan, whose logits a sharded plan's match (tests/test_tensor_parallel.py)")
    graph = Graph.from_dict(plan.body["graph"])
    ids = encode(plan, prompt, token_ids)
    max_len = plan.body["runtime"]["max_model_len"]
    if len(ids) > max_len:
        raise RequestError(f"verify requires at most the plan's max model length ({max_len}) tokens; got {len(ids)}")
    schemes = sorted({w.scheme for w in graph.weights.values()} - {"none"})
    # an FP8 KV cache (--kv-cache-dtype fp8) rounds K and V as FP8 weights round theirs
    fp8_kv = sorted({s.dtype for s in graph.state if s.kind == "paged_kv" and s.dtype.startswith("float8")})
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCE.get(graph.attrs["dtype"], 1e-1)
        if schemes or fp8_kv:
            tolerance = max(tolerance, QUANTIZED_TOLERANCE)
    with tempfile.TemporaryDirectory(prefix="rdnac-verify-") as tmp:
        ref_plan = compile_reference(model, Path(tmp), max_len)
        ref_graph = Graph.from_dict(ref_plan.body["graph"])
        ref_inputs = step_inputs(ref_graph, ids, ref_plan.body["runtime"]["kv_block_size"])
        with torch.inference_mode():
            reference = interpreter.run(ref_graph, ref_plan.load_weights("cpu"), ref_inputs,
                                        keep=_all_values(ref_graph))
    values, runner = run_plan(plan, plan.load_weights("cpu"), ids, interpret)
    result = VerifyResult(str(plan.path), str(model), len(ids), tolerance, runner)
    if schemes and tolerance >= QUANTIZED_TOLERANCE:
        result.notes.append(f"tolerance {tolerance:g}: the plan's weights are quantized ({', '.join(schemes)})")
    if fp8_kv and tolerance >= QUANTIZED_TOLERANCE:
        result.notes.append(f"tolerance {tolerance:g}: the plan's KV cache is {fp8_kv[0]}")
    if ref_plan.header["model"]["config_sha256"] != plan.header["model"]["config_sha256"]:
        result.notes.append(f"the plan was compiled from a checkpoint whose config differs from {model}")
    result.rows = compare_values(graph, values, reference, tolerance)
    if not result.rows:
        raise RdnacError(f"{plan.path} and the reference share no value names; requires the plan to be compiled "
                         f"from {model}")
    return result


def render_verify(result: VerifyResult, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"{result.plan} ({result.runner}) vs unfused float32 reference of {result.reference}: "
                        f"{result.num_tokens} tokens, tolerance {result.tolerance:g} (max abs error / max abs value)",
                  title_justify="left")
    for col in ("node (→ value)", "op", "max abs err", "scale", "error", ""):
        table.add_column(col, overflow="fold", justify="right" if col in ("max abs err", "scale", "error") else "left")
    first = result.first_failure
    for r in result.rows:
        mark = "ok" if r.is_ok else ("FIRST" if r is first else "over")
        style = None if r.is_ok else ("bold red" if r is first else "red")
        name = r.node if r.value == r.node else f"{r.node} → {r.value}"
        table.add_row(name, r.op, f"{r.max_abs_error:.3g}", f"{r.scale:.3g}",
                      f"{r.error:.3g}", mark + (f" ({r.note})" if r.note else ""), style=style)
    console.print(table)
    if first is None:
        worst = max(result.rows, key=lambda r: r.error)
        console.print(f"ok: all {len(result.rows)} values within tolerance {result.tolerance:g} "
                      f"(largest error {worst.error:.3g} at {worst.node})")
    for note in result.notes:
        console.print(f"note: {note}")

"""`rdnac.compile`: checkpoint -> frontend -> passes -> (kernels) -> plan file.

The target is resolved (and, for a GPU, its capabilities probed) once, into
one `CompileState`; `PASSES` then run in order over it, each
`run(state) -> None`, the graph verified after each. Targets other than cpu
end with kernel selection and the AOT build (`select_kernels`, `build.py`);
the cpu target's plan is run by the reference interpreter.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

import rdnac
from rdnac.compiler.frontend import build_graph, read_checkpoint
from rdnac.compiler.passes import (CompileState, Pass, dce, fp8_layout, fuse_act_linear, fuse_act_quant,
                                   fuse_add_rms_norm,
                                   fuse_attention_quant, fuse_gated_linear, fuse_norm_quant, fuse_qk_norm_rope_cache,
                                   int8_layout,
                                   kv_cache_dtype, merge_linears, mla_forms, quantize, quantize_lm_head, quantize_mxfp4,
                                   select_kernels, shard)
from rdnac.errors import CheckpointError, RdnacError, RdnacWarning
from rdnac.ir.verify import verify
from rdnac.plans import write_plan
from rdnac.targets import get_target

# The graph passes --disable-pass can skip (see PASSES for the order): those before fp8_layout, and those
# after it. `rdnac verify` compiles its reference with all of them but dce disabled.
GRAPH_PASSES = ("merge_linears", "fuse_add_rms_norm", "fuse_qk_norm_rope_cache", "dce")
LATE_PASSES = ("fuse_norm_quant", "fuse_act_quant", "fuse_attention_quant", "fuse_gated_linear", "fuse_act_linear")
# early_metadata_loads: with PDL, step inputs no kernel writes are read before the wait (_early_meta);
# early_weight_loads: with PDL, GEMMs load their first weight tile before the wait (_early_weights).
# What --disable-pass accepts:
DISABLEABLE = GRAPH_PASSES + LATE_PASSES + ("early_metadata_loads", "early_weight_loads")
_DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE_SCHEMES = ("fp8", "fp8-block", "int8", "mxfp4")
EP_DISPATCH = ("all-reduce", "all-to-all")  # --ep-dispatch: how expert-parallel MoE layers meet (shard_dispatch.py)


@dataclass(frozen=True)
class CompileOptions:
    target: str = "cpu"
    dtype: str | None = None  # compute dtype; default float32 on cpu, bfloat16 on GPUs
    max_model_len: int | None = None
    kv_block_size: int = 16
    disable_passes: tuple[str, ...] = field(default_factory=tuple)
    verify_each_pass: bool = True
    max_num_seqs: int = 64  # largest decode batch a GPU plan has kernels for
    max_num_batched_tokens: int = 2048  # largest prefill step; longer prompts are chunked
    quiet: bool = False
    quantize: str | None = None  # compile-time FP8 / INT8 of the linears ("fp8" | "fp8-block" | "int8"), MXFP4 of
    # MoE experts ("mxfp4")
    quantize_skip: tuple[str, ...] | None = None  # --quantize-skip: regexes of linears kept float (None: the default)
    fp8_lm_head: bool = False  # the logits projection as an FP8 GEMM (per-channel weight, float32 logits)
    pdl: bool | None = None  # programmatic dependent launch; None: where the target has it (sm90+)
    tokenizer: str | None = None  # --tokenizer: an HF directory (or model id) whose tokenizer replaces the checkpoint's
    kv_cache_dtype: str = "auto"  # "auto": the compute dtype; "fp8": the target's FP8 format (kv_cache_dtype.py)
    tp: int = 1  # tensor-parallel ranks (passes/shard.py)
    ep: bool = False  # with tp > 1: experts placed whole per rank instead of sliced
    ep_dispatch: str = "all-reduce"  # with ep: "all-reduce" (partial sums) or "all-to-all" (shard_dispatch.py)

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise RdnacError(f"--dtype requires one of {', '.join(_DTYPES)}; got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise RdnacError(f"--max-model-len requires a positive integer; got {self.max_model_len}")
        if not 1 <= self.max_num_seqs <= 1024:
            raise RdnacError(f"--max-num-seqs requires 1..1024; got {self.max_num_seqs}")
        if not 16 <= self.max_num_batched_tokens <= 32768:
            raise RdnacError(f"--max-num-batched-tokens requires 16..32768; got {self.max_num_batched_tokens}")
        if self.quantize is not None and self.quantize not in QUANTIZE_SCHEMES:
            raise RdnacError(f"--quantize requires one of {', '.join(QUANTIZE_SCHEMES)}; got {self.quantize!r}")
        if self.quantize_skip is not None:
            if self.quantize not in ("fp8", "fp8-block", "int8"):
                raise RdnacError(f"--quantize-skip requires --quantize fp8, fp8-block or int8; got --quantize "
                                 f"{self.quantize}")
            for pattern in self.quantize_skip:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise RdnacError(f"--quantize-skip requires a regular expression; got {pattern!r} ({e})") from None
        unknown = [name for name in self.disable_passes if name not in DISABLEABLE]
        if unknown:
            raise RdnacError(f"--disable-pass: no pass named {', '.join(map(repr, unknown))}; "
                             f"the passes are {', '.join(DISABLEABLE)}")
        if self.kv_cache_dtype not in kv_cache_dtype.CHOICES:
            raise RdnacError(f"--kv-cache-dtype requires one of {', '.join(kv_cache_dtype.CHOICES)}; "
                             f"got {self.kv_cache_dtype!r}")
        if isinstance(self.tp, bool) or not isinstance(self.tp, int) or not 1 <= self.tp <= 64:
            raise RdnacError(f"--tp requires an integer number of ranks in 1..64; got {self.tp!r}")
        if self.ep and self.tp == 1:
            raise RdnacError("--ep requires --tp N with N > 1 (the ranks the experts are placed on); got --tp 1")
        if self.ep_dispatch not in EP_DISPATCH:
            raise RdnacError(f"--ep-dispatch requires one of {', '.join(EP_DISPATCH)}; got {self.ep_dispatch!r}")
        if self.ep_dispatch == "all-to-all" and not self.ep:
            raise RdnacError(f"--ep-dispatch all-to-all requires --ep (it sends each token to the ranks holding its "
                             f"experts whole); got --tp {self.tp} without --ep; add --ep")
        if self.kv_block_size not in (8, 16, 32, 64):
            raise RdnacError(f"kv_block_size requires 8, 16, 32 or 64; got {self.kv_block_size}")


def _model_identity(checkpoint) -> dict:
    source = checkpoint.source or {}
    # a model id's snapshot directory is named by its commit sha: the id's NAME says more
    name = source.get("name") or checkpoint.path.name.removesuffix(".gguf")
    identity = {"name": name, "path": str(checkpoint.path), "format": checkpoint.format,
                "architecture": (checkpoint.config.get("architectures") or ["?"])[0],
                "config_sha256": hashlib.sha256(json.dumps(checkpoint.config, sort_keys=True, default=str)
                                                .encode()).hexdigest()}
    if source:
        identity.update(model_id=source["model_id"], revision=source["commit"])
    return identity


def default_output(model: str | Path, target: str) -> Path:
    stem = str(model).removeprefix("demo:").rstrip("/").split("/")[-1].removesuffix(".gguf")
    stem = stem.split("@")[0].split(":")[0]  # ORG/NAME@REVISION:QUANT -> NAME
    return Path(f"{stem}.{target}.msgpack")


def _drop_unused_weights(state: CompileState) -> None:
    """The weights the graph no longer names (merged, removed) leave the weights dict too."""
    for name in [k for k in state.weights if k not in state.graph.weights]:
        del state.weights[name]


def _plan_runtime(state: CompileState) -> None:
    """The plan's runtime defaults, and the launch flags (PDL, early metadata loads) with their decisions."""
    opts, graph = state.options, state.graph
    positions = graph.attrs["max_position_embeddings"]
    max_len = min(opts.max_model_len or positions, positions)
    if opts.max_model_len and opts.max_model_len > positions:
        why = (f"--max-model-len {opts.max_model_len} is above the model's {positions} positions "
               f"(max_position_embeddings); the plan holds {positions} tokens per sequence")
        warnings.warn(why, RdnacWarning, stacklevel=2)
        state.decide("runtime", "-", f"max_model_len {positions}", why)
    state.runtime = {"kv_block_size": opts.kv_block_size, "max_model_len": max_len,
                     "device": "cuda" if state.target.is_gpu else "cpu", "max_num_seqs": opts.max_num_seqs,
                     "max_num_batched_tokens": opts.max_num_batched_tokens, "pdl": _pdl(state)}
    state.runtime["early_meta"] = _early_meta(state)
    state.runtime["early_weights"] = _early_weights(state)


# The passes of a compile, in order. Those named in DISABLEABLE can be skipped with --disable-pass
# (the skip is logged); quantize and quantize_lm_head do something only when asked, select_kernels only
# for GPU targets.
PASSES: tuple[tuple[str, Pass], ...] = (
    ("quantize", quantize.run),  # --quantize fp8|fp8-block: compile-time FP8 of a float checkpoint's linears
    ("quantize_mxfp4", quantize_mxfp4.run),  # --quantize mxfp4: compile-time MXFP4 of a MoE checkpoint's experts
    ("quantize_lm_head", quantize_lm_head.run),  # --fp8-lm-head
    ("merge_linears", merge_linears.run),
    ("fuse_add_rms_norm", fuse_add_rms_norm.run),
    ("fuse_qk_norm_rope_cache", fuse_qk_norm_rope_cache.run),
    ("dce", dce.run),
    ("mla_forms", mla_forms.run),  # MLA: expanded prefill, absorbed decode (with their weights)
    ("drop_unused_weights", _drop_unused_weights),
    ("fp8_layout", fp8_layout.run),  # fixes each FP8 linear's format and activation scheme (a16w8 is not fused)
    ("int8_layout", int8_layout.run),  # INT8 linears: the target's int8 dot must be native (no fallback)
    ("fuse_norm_quant", fuse_norm_quant.run),
    ("fuse_act_quant", fuse_act_quant.run),
    ("fuse_attention_quant", fuse_attention_quant.run),
    # last: a gated_act whose FP8 quantization fused into it stays a gated_act_quant
    ("fuse_gated_linear", fuse_gated_linear.run),
    ("fuse_act_linear", fuse_act_linear.run),  # the FP8 down projection computes its own activations
    ("kv_cache_dtype", kv_cache_dtype.run),  # --kv-cache-dtype fp8: after the fusions, on the final cache users
    ("shard", shard.run),  # --tp N: per-rank weights and collectives (after fusion: it shards the fused graph)
    ("runtime", _plan_runtime),
    ("select_kernels", select_kernels.run),
)


def check_output(out: Path) -> None:
    """Refuse an output path that cannot be written before compiling, not after: its directory must exist
    and take new files (probed by creating one: permission bits, read-only mounts and ACLs all count)."""
    import tempfile

    if out.is_dir():
        raise RdnacError(f"{out}: the output requires a plan file path; got a directory; pass -o DIR/NAME.msgpack")
    parent = out.parent
    if not parent.exists():
        raise RdnacError(f"{out}: the output requires an existing directory; {parent} does not exist; create it "
                         "or choose another -o")
    if not parent.is_dir():
        raise RdnacError(f"{out}: the output requires a directory; {parent} is a file; choose another -o")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise RdnacError(f"{out}: the output requires a directory rdnac can write; creating a file in {parent} "
                         f"failed ({e.strerror}); choose another -o") from None


def compile_model(model: str | Path, target: str = "cpu", output: str | Path | None = None, **options) -> Path:
    opts = CompileOptions(target=target, **options)
    tgt = get_target(target)
    if opts.kv_cache_dtype == "fp8":
        kv_cache_dtype.kv_fp8_format(tgt)  # refuses a target without FP8 before reading the checkpoint
    out = Path(output) if output else default_output(model, target)
    check_output(out)
    checkpoint = read_checkpoint(model)
    if opts.tokenizer is not None:
        from rdnac.compiler.frontend.hf import override_tokenizer

        override_tokenizer(checkpoint, opts.tokenizer)
    dtype = opts.dtype or ("bfloat16" if tgt.is_gpu else "float32")
    graph, weights, decisions = build_graph(checkpoint, dtype)
    verify(graph)
    check_finite(weights, checkpoint.path)
    caps = None
    if tgt.is_gpu:
        from rdnac.targets.probe import probe

        caps = probe(tgt)
    state = CompileState(graph, weights, tgt, opts, capabilities=caps)
    if opts.kv_cache_dtype == "fp8":
        state.kv_scales = kv_cache_dtype.checkpoint_scales(checkpoint)
    state.decisions.extend({"pass": "reader", "node": "-", "action": note, "reason": ""} for note in checkpoint.notes)
    state.decisions.extend(decisions)
    for name, run_pass in PASSES:
        if name in opts.disable_passes:
            state.decide(name, "-", "skipped", "disabled with --disable-pass")
            continue
        run_pass(state)
        if opts.verify_each_pass:
            verify(state.graph)
    triton_version = None
    if tgt.is_gpu:
        import triton

        triton_version = triton.__version__
    header = {
        "rdnac_version": rdnac.__version__, "torch_version": torch.__version__, "triton_version": triton_version,
        "target": target, "target_info": tgt.to_dict(), "capabilities": caps.to_dict() if caps else None,
        "model": _model_identity(checkpoint),
        "compile_options": {"dtype": dtype, "max_model_len": opts.max_model_len,
                            "disable_passes": list(opts.disable_passes), "quantize": opts.quantize,
                            "quantize_skip": list(opts.quantize_skip) if opts.quantize_skip is not None else None,
                            "fp8_lm_head": opts.fp8_lm_head, "pdl": opts.pdl, "tokenizer": opts.tokenizer,
                            "kv_cache_dtype": opts.kv_cache_dtype, "tp": opts.tp, "ep": opts.ep,
                            "ep_dispatch": opts.ep_dispatch},
        "created_unix": int(time.time()),
    }
    body = {
        "graph": state.graph.to_dict(),
        "decisions": state.decisions,
        "kernels": [b.to_dict() for b in state.binaries],
        "program": state.program,
        "runtime": state.runtime,
        "tokenizer": {"json": checkpoint.tokenizer_json, "config": _jsonable(checkpoint.tokenizer_config)},
        "chat_template": checkpoint.chat_template,
        "generation_config": _jsonable(checkpoint.generation_config),
    }
    from safetensors import SafetensorError

    try:
        write_plan(out, header, body, state.weights, state.rank_weights or None)
    except (OSError, SafetensorError) as e:  # a full disk, a quota, the directory gone mid-compile
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise RdnacError(f"{out}: writing the plan requires space and write access; got {reason}; free space "
                         "or choose another -o") from None
    return out


_FINITE_CHUNK = 1 << 24  # elements checked at once: bounds the temporary mask (16 MB)


def check_finite(weights: dict[str, torch.Tensor], source) -> None:
    """Refuse NaN or inf in a float weight, naming the tensor: such a checkpoint compiles and runs, and
    then prints nothing useful (a blank line, exit 0)."""
    for name, tensor in weights.items():
        if not tensor.is_floating_point():
            continue  # integer data (packed FP8/FP4 bits) has no non-finite values; its float scales are checked
        flat = tensor.reshape(-1)
        num_bad, first = 0, None
        for start in range(0, flat.numel(), _FINITE_CHUNK):
            part = flat[start:start + _FINITE_CHUNK]
            part = part.float() if part.element_size() == 1 else part  # float8 has no sum or isfinite
            if torch.isfinite(part.sum(dtype=torch.float32)):  # any NaN/inf makes the sum NaN/inf; 10x faster
                continue  # than isfinite here (an overflowing sum only sends the chunk to the exact check)
            bad = ~torch.isfinite(part)
            n = int(bad.sum())
            if n and first is None:
                first = start + int(bad.nonzero()[0, 0])
            num_bad += n
        if num_bad:
            index = list(torch.unravel_index(torch.tensor(first), tuple(tensor.shape))) if tensor.dim() else []
            raise CheckpointError(f"{source}: tensor {name!r} requires finite values; got {num_bad} NaN or inf of "
                                  f"{tensor.numel()} (the first at {[int(i) for i in index]}); the checkpoint is "
                                  "corrupt: download or export it again")


def _jsonable(d: dict) -> dict:
    """msgpack-safe copy (tokenizer_config may hold nested objects such as AddedToken dicts)."""
    return json.loads(json.dumps(d, default=str))


def _pdl_early_loads(state: CompileState, what: str, pass_name: str, why: str) -> bool:
    """Whether kernels load `what` before the PDL wait: on with PDL unless `--disable-pass pass_name`; logged."""
    if not state.runtime["pdl"]:
        return False
    if pass_name in state.options.disable_passes:
        state.decide("launch", "-", f"early {what} loads off", f"disabled with --disable-pass {pass_name}")
        return False
    state.decide("launch", "-", f"early {what} loads on", why)
    return True


def _early_meta(state: CompileState) -> bool:
    """Whether kernels read the step's host-written inputs (positions, slots, sequence lengths, block
    tables) before the PDL wait (decode attention and q/k-norm + RoPE + cache; see their modules)."""
    return _pdl_early_loads(state, "metadata", "early_metadata_loads",
                            "with PDL a kernel's programs start while the one before runs; the step inputs the host "
                            "wrote before the step (no kernel writes them) are read, and RoPE's angles computed, "
                            "before waiting on it, so fewer dependent loads follow the wait")


def _early_weights(state: CompileState) -> bool:
    """Whether FP8 block GEMMs load their first weight tile before the PDL wait (`rdnac.kernels.gemm_fp8`)."""
    return _pdl_early_loads(state, "weight", "early_weight_loads",
                            "with PDL a GEMM's programs start while the kernel before runs (a norm, RoPE, attention, "
                            "an activation): each loads its first weight tile and its scales, which no kernel "
                            "writes, before waiting on it, so the weight stream overlaps the small kernels")


def _pdl(state: CompileState) -> bool:
    """Whether the plan's kernels use programmatic dependent launch (`rdnac.kernels.launch.with_pdl`)."""
    opts, tgt = state.options, state.target
    if opts.pdl and not tgt.has_pdl:
        raise RdnacError(f"--pdl requires a target with programmatic dependent launch (NVIDIA sm90 or newer); "
                         f"{tgt.name} has none")
    on = tgt.has_pdl if opts.pdl is None else opts.pdl
    if tgt.is_gpu:
        why = ("--no-pdl" if opts.pdl is False else "the target has it: each kernel lets the next one's blocks "
               "start and waits on the GPU for its predecessor (no launch gap)") if tgt.has_pdl else \
            "the target has no programmatic dependent launch"
        state.decide("launch", "-", "programmatic dependent launch " + ("on" if on else "off"), why)
    return on

"""`quantization_config` -> the FP8 scheme of each linear weight (frontend).

Two checkpoint conventions are read:

- HF `quant_method: fp8` (transformers' fine-grained FP8, vLLM's `fp8`):
  `weight_block_size: null` is per-tensor (a scalar `weight_scale`, or
  `weight_scale_inv` in transformers' naming; both MULTIPLY the fp8 weight),
  `[bn, bk]` is per-block (`weight_scale_inv` [ceil(N/bn), ceil(K/bk)]).
  `activation_scheme: static` reads `input_scale` (or `activation_scale`);
  `dynamic` quantizes activations at run time.
- `quant_method: compressed-tensors` (llm-compressor) with float 8-bit
  weights, strategy "tensor", "channel" ([N, 1] `weight_scale`) or "block";
  or, format "int-quantized", int8 W8A8: symmetric int8 weights per channel
  ([N, 1] `weight_scale`) or tensor, activations int8 dynamic per token
  (`linear_int8`). Other int schemes (4-bit, group-wise, static or asymmetric
  activations) are refused naming the field.
- `quant_method: mxfp4` (GPT-OSS): the MoE experts are MXFP4
  (`*_blocks`, `*_scales`; read by frontend/mxfp4.py); every linear stays
  float, as transformers' Mxfp4 integration converts experts only.

Modules listed in `modules_to_not_convert` / `ignore` stay in float. The
scheme is decided by these keys only, never by tensor names: a per-tensor
checkpoint whose scale is called `weight_scale_inv` is still per-tensor.
The builder checks each tensor's dtype and shape against the scheme.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rdnac.errors import UnsupportedModelError

FP8_METHODS = ("fp8", "compressed-tensors")
METHODS = (*FP8_METHODS, "mxfp4")


@dataclass(frozen=True)
class LinearScheme:
    """How one linear weight is stored in the checkpoint, and how its activations are quantized."""

    weight_scheme: str  # "tensor" | "channel" | "block"
    act_scheme: str  # "static" | "dynamic_token" | "dynamic_group" | "none" (linear_fp8's act_scheme)
    block_size: tuple[int, int] | None
    weight_scale_names: tuple[str, ...]  # tensor suffixes that may hold the weight scale, in preference order
    input_scale_names: tuple[str, ...]  # tensor suffixes of a static input scale
    act_note: str = ""  # why act_scheme differs from what the config literally says, if it does
    fmt: str = "e4m3fn"  # the stored 8-bit format: "e4m3fn" (linear_fp8) or "int8" (linear_int8)

    @property
    def tag(self) -> str:
        """Short scheme name for WeightSpec.scheme and messages: fp8-tensor, fp8-channel, fp8-block128x128,
        int8-channel."""
        if self.weight_scheme == "block":
            return f"fp8-block{self.block_size[0]}x{self.block_size[1]}"
        return f"{'int8' if self.fmt == 'int8' else 'fp8'}-{self.weight_scheme}"


@dataclass(frozen=True)
class QuantConfig:
    method: str  # "fp8" | "compressed-tensors" | "mxfp4"
    groups: tuple[tuple[tuple[str, ...], LinearScheme], ...]  # (targets, scheme); first match wins
    not_converted: tuple[str, ...]  # module patterns that stay in float
    ignored_tensors: tuple[tuple[str, str], ...] = ()  # (regex over tensor names, reason), e.g. kv-cache scales
    summary: str = ""

    def scheme_for(self, *module_names: str) -> LinearScheme | None:
        """The scheme of the linear module known by any of `module_names` (checkpoint and canonical
        names), or None if it stays in float."""
        if any(_matches(p, m, self.method) for p in self.not_converted for m in module_names):
            return None
        for targets, scheme in self.groups:
            if any(_target_matches(t, m) for t in targets for m in module_names):
                return scheme
        return None

    def has_mxfp4_experts(self, module: str) -> bool:
        """Whether the experts module `module` is stored MXFP4 (an mxfp4 config that does not exclude it)."""
        return self.method == "mxfp4" and not any(_matches(p, module, self.method) for p in self.not_converted)


def _matches(pattern: str, module: str, method: str) -> bool:
    if method == "compressed-tensors":  # llm-compressor: "re:<regex>" or a module name (suffix)
        if pattern.startswith("re:"):
            return re.match(pattern[3:], module) is not None
        return module == pattern or module.endswith("." + pattern)
    # transformers' rule: a regex from the start up to a module boundary, or a suffix
    return bool(re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", module)) or module.endswith(pattern)


def _target_matches(target: str, module: str) -> bool:
    if target == "Linear":  # scheme_for is only asked about linear modules
        return True
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return module == target or module.endswith("." + target)


def parse_quant_config(config: dict, path) -> QuantConfig | None:
    """The checkpoint's quantization, or None for a float checkpoint."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method == "fp8":
        return _parse_hf_fp8(qc, path)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(qc, path)
    if method == "mxfp4":
        not_converted = tuple(qc.get("modules_to_not_convert") or ())
        return QuantConfig("mxfp4", (), not_converted, summary="mxfp4 experts (e2m1 blocks, e8m0 scales per 32); "
                           f"linears float{', not converted: ' + ', '.join(not_converted) if not_converted else ''}")
    raise UnsupportedModelError(f"{path}: quantization_config.quant_method {method!r} is not supported; "
                                f"supported: {', '.join(METHODS)}; or use a bf16/fp16/fp32 checkpoint")


def _parse_hf_fp8(qc: dict, path) -> QuantConfig:
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise UnsupportedModelError(f"{path}: quantization_config.fmt {fmt!r} is not supported; requires e4m3")
    block = qc.get("weight_block_size")
    activation = qc.get("activation_scheme", "dynamic")
    if activation not in ("static", "dynamic"):
        raise UnsupportedModelError(f"{path}: quantization_config.activation_scheme requires static or dynamic; "
                                    f"got {activation!r}")
    if block is None:
        weight_scheme, block_size, scale_names = "tensor", None, ("weight_scale", "weight_scale_inv")
        dynamic, note = "dynamic_token", ("activation_scheme dynamic is per-tensor in vLLM; rdnac quantizes per "
                                          "token (one pass, no atomic max, finer scales)")
    else:
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise UnsupportedModelError(f"{path}: quantization_config.weight_block_size requires null or "
                                        f"[rows, cols]; got {block!r}")
        weight_scheme, block_size, scale_names = "block", (block[0], block[1]), ("weight_scale_inv",)
        dynamic, note = "dynamic_group", ""
    scheme = LinearScheme(weight_scheme, "static" if activation == "static" else dynamic, block_size,
                          scale_names, ("input_scale", "activation_scale"), "" if activation == "static" else note)
    not_converted = tuple(qc.get("modules_to_not_convert") or qc.get("ignored_layers") or ())
    summary = (f"fp8 {scheme.tag}, activation_scheme {activation}"
               f"{', not converted: ' + ', '.join(not_converted) if not_converted else ''}")
    return QuantConfig("fp8", ((("Linear",), scheme),), not_converted, summary=summary)


_CT_FORMATS = ("float-quantized", "naive-quantized", "int-quantized")


def _parse_compressed_tensors(qc: dict, path) -> QuantConfig:
    fmt = qc.get("format")
    if fmt not in _CT_FORMATS:
        raise UnsupportedModelError(f"{path}: compressed-tensors quantization_config.format requires one of "
                                    f"{', '.join(_CT_FORMATS)} (FP8 or int8 W8A8 weights); got {fmt!r}")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise UnsupportedModelError(f"{path}: compressed-tensors quantization_status {status!r} is not supported; "
                                    "requires compressed (FP8 values stored)")
    groups = []
    for group_name, group in (qc.get("config_groups") or {}).items():
        where = f"{path}: compressed-tensors config_groups.{group_name}"
        group_fmt = group.get("format") or fmt  # a group may name its own format (mixed checkpoints)
        if group_fmt not in _CT_FORMATS:
            raise UnsupportedModelError(f"{where}.format requires one of {', '.join(_CT_FORMATS)}; got {group_fmt!r}")
        is_int = (group.get("weights") or {}).get("type") == "int"
        scheme = _compressed_int8_group(group, group_fmt, where) if is_int else _compressed_group(group, where)
        groups.append((tuple(group.get("targets") or ("Linear",)), scheme))
    if not groups:
        raise UnsupportedModelError(f"{path}: compressed-tensors quantization_config requires config_groups")
    ignored_tensors = ()
    if qc.get("kv_cache_scheme"):
        ignored_tensors = ((r".*\.(k_scale|v_scale|kv_scale)", "kv_cache_scheme: the checkpoint's KV scales are "
                            "read by --kv-cache-dtype fp8 only (else the KV cache is in the compute dtype)"),)
    not_converted = tuple(qc.get("ignore") or ())
    summary = (f"compressed-tensors {', '.join(s.tag + '/' + s.act_scheme for _, s in groups)}"
               f"{', ignore: ' + ', '.join(not_converted) if not_converted else ''}")
    return QuantConfig("compressed-tensors", tuple(groups), not_converted, ignored_tensors, summary)


def _compressed_group(group: dict, where: str) -> LinearScheme:
    w = group.get("weights") or {}
    if w.get("type") != "float" or w.get("num_bits") != 8:
        raise UnsupportedModelError(f"{where}: weights requires type float, num_bits 8 (FP8); got type "
                                    f"{w.get('type')!r}, num_bits {w.get('num_bits')!r}")
    strategy = w.get("strategy")
    block_size = None
    if strategy == "block":
        bs = w.get("block_structure")
        if not (isinstance(bs, list) and len(bs) == 2):
            raise UnsupportedModelError(f"{where}: weights strategy block requires block_structure [rows, cols]; "
                                        f"got {bs!r}")
        block_size = (int(bs[0]), int(bs[1]))
    elif strategy not in ("tensor", "channel"):
        raise UnsupportedModelError(f"{where}: weights strategy {strategy!r} is not supported; "
                                    "supported: tensor, channel, block")
    a = group.get("input_activations")
    note = ""
    if a is None:
        act = "none"
    else:
        if a.get("type") != "float" or a.get("num_bits") != 8:
            raise UnsupportedModelError(f"{where}: input_activations requires type float, num_bits 8; got "
                                        f"type {a.get('type')!r}, num_bits {a.get('num_bits')!r}")
        a_strategy, dynamic = a.get("strategy"), a.get("dynamic")
        if not dynamic and a_strategy == "tensor":
            act = "static"
        elif dynamic and a_strategy == "token":
            act = "dynamic_token"
        elif dynamic and a_strategy == "tensor":
            act, note = "dynamic_token", "dynamic per-tensor activations are quantized per token (finer scales)"
        elif dynamic and a_strategy == "group" and block_size and a.get("group_size") == block_size[1]:
            act = "dynamic_group"
        else:
            raise UnsupportedModelError(f"{where}: input_activations strategy {a_strategy!r} with dynamic "
                                        f"{dynamic!r} is not supported; supported: static tensor, dynamic token, "
                                        "dynamic group of the weight block's width")
    return LinearScheme(strategy, act, block_size, ("weight_scale",), ("input_scale",), note)


def _compressed_int8_group(group: dict, fmt: str, where: str) -> LinearScheme:
    """An int config group: only W8A8 as llm-compressor's W8A8 int8 scheme writes it (symmetric int8 weights per
    channel or tensor, int8 activations quantized dynamically per token); anything else names its field."""
    w = group.get("weights") or {}
    checks = [("format", fmt, fmt == "int-quantized", "int-quantized (int8 values stored unpacked)"),
              ("weights.num_bits", w.get("num_bits"), w.get("num_bits") == 8, "8 (int8 W8A8)"),
              ("weights.strategy", w.get("strategy"), w.get("strategy") in ("channel", "tensor"),
               "channel or tensor (group-wise int8 is not supported)"),
              ("weights.symmetric", w.get("symmetric", True), w.get("symmetric", True) is True, "true")]
    a = group.get("input_activations")
    if a is None:
        checks.append(("input_activations", None, False, "int8 activations, dynamic per token (W8A8; W8A16 is "
                                                          "not supported)"))
    else:
        checks += [("input_activations.type", a.get("type"), a.get("type") == "int", "int"),
                   ("input_activations.num_bits", a.get("num_bits"), a.get("num_bits") == 8, "8"),
                   ("input_activations.dynamic", a.get("dynamic"), a.get("dynamic") is True,
                    "true (static activation scales are not supported for int8)"),
                   ("input_activations.strategy", a.get("strategy"), a.get("strategy") in ("token", "tensor"),
                    "token"),
                   ("input_activations.symmetric", a.get("symmetric", True), a.get("symmetric", True) is True,
                    "true (asymmetric activations are not supported)")]
    for field, got, ok, wanted in checks:
        if not ok:
            raise UnsupportedModelError(f"{where}.{field} requires {wanted}; got {got!r}; only int8 W8A8 "
                                        "(channel/tensor weights, dynamic per-token activations) is supported")
    note = ("dynamic per-tensor activations are quantized per token (finer scales)"
            if a.get("strategy") == "tensor" else "")
    return LinearScheme(w["strategy"], "dynamic_token", None, ("weight_scale",), ("input_scale",), note, fmt="int8")

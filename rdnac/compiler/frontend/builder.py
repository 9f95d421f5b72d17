"""A small graph builder that family files write against, with strict coverage.

Every checkpoint tensor must be consumed by `weight()` / `linear()` or
ignored with a reason by `ignore()`; `finish()` fails listing the rest.
Shapes are checked when a weight is taken; float weights are converted to
the plan's compute dtype. FP8 linears (per the checkpoint's
`quantization_config`, see quant.py) become `linear_fp8` nodes whose weight
keeps its float8 bits and whose scales are float32.

Family files use canonical (text model) names: `model.layers.0...`,
`lm_head.weight`. `alias_prefix()` maps a wrapper's names onto them
(`model.language_model.` -> `model.`); each graph weight records the
checkpoint tensor it came from.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from rdnac.compiler.frontend.checkpoint import Checkpoint
from rdnac.compiler.frontend.quant import LinearScheme, parse_quant_config
from rdnac.errors import CheckpointError
from rdnac.ir.graph import Graph, Node, TensorSpec, WeightSpec
from rdnac.ir.state import StateSpec

_FLOAT_DTYPES = {"float32", "float16", "bfloat16", "float64"}
_FP8_DTYPES = {"float8_e4m3fn", "uint8"}  # uint8: FP8 bits some checkpoints store untyped
# the stored dtypes of a quantized linear weight, by its scheme's format (LinearScheme.fmt)
_QUANT_DTYPES = {"e4m3fn": _FP8_DTYPES, "int8": {"int8"}}


class GraphBuilder:
    def __init__(self, checkpoint: Checkpoint, dtype: str):
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.inputs: dict[str, TensorSpec] = {}
        self.weight_specs: dict[str, WeightSpec] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.nodes: list[Node] = []
        self.state: list[StateSpec] = []
        self.decisions: list[dict] = []
        self._consumed: set[str] = set()  # canonical names
        self._ignored: dict[str, str] = {}
        self._actual = {name: name for name in checkpoint.tensors.names()}  # canonical -> checkpoint name
        self.quant = parse_quant_config(checkpoint.config, checkpoint.path)
        if self.quant:
            self.decide("quantization_config", "read", self.quant.summary)
            for pattern, reason in self.quant.ignored_tensors:
                self.ignore(pattern, reason)

    @property
    def _names(self) -> set[str]:
        return set(self._actual)

    def has(self, name: str) -> bool:
        return name in self._actual

    def shape_of(self, name: str) -> tuple[int, ...] | None:
        """The stored shape of canonical checkpoint tensor `name` (None if absent), without loading it."""
        if name not in self._actual:
            return None
        return tuple(self.checkpoint.tensors.spec(self._actual[name])[1])

    def alias_prefix(self, prefix: str, canonical: str) -> int:
        """Address checkpoint tensors named `prefix...` as `canonical...`; returns how many were renamed."""
        renamed = {c: a for c, a in self._actual.items() if c.startswith(prefix)}
        for c, a in renamed.items():
            del self._actual[c]
            new = canonical + c[len(prefix):]
            if new in self._actual:
                raise CheckpointError(f"{self.checkpoint.path}: tensors {a!r} and {self._actual[new]!r} both "
                                      f"map to {new!r}; the checkpoint mixes two naming layouts")
            self._actual[new] = a
        if renamed:
            self.decide(prefix + "*", f"read as {canonical}*", f"{len(renamed)} tensors of the text model")
        return len(renamed)

    def input(self, name: str, dtype: str, shape: tuple) -> str:
        self.inputs[name] = TensorSpec(dtype, tuple(shape))
        return name

    def state_input(self, name: str, kind: str, layer: int, dtype: str, shape: tuple[int, ...]) -> str:
        """Declare one state tensor (ir/state.py) and the graph input it feeds."""
        spec = StateSpec(name, kind, layer, dtype, tuple(shape))
        self.state.append(spec)
        return self.input(name, dtype, spec.graph_shape())

    def _spec(self, name: str, shape: tuple[int, ...]) -> str:
        """Checkpoint dtype of canonical tensor `name` after checking it exists with `shape`."""
        if name not in self._actual:
            raise CheckpointError(f"{self.checkpoint.path}: missing tensor {name!r} (shape {list(shape)}) "
                                  "required by the model config")
        src_dtype, src_shape = self.checkpoint.tensors.spec(self._actual[name])
        if tuple(src_shape) != tuple(shape):
            raise CheckpointError(f"{self.checkpoint.path}: tensor {self._actual[name]!r} requires shape "
                                  f"{list(shape)} from config.json; got {list(src_shape)}")
        return src_dtype

    def _load(self, name: str) -> torch.Tensor:
        self._consumed.add(name)
        return self.checkpoint.tensors.load(self._actual[name])

    def weight(self, name: str, shape: tuple[int, ...], dtype: str | None = None,
               why_float: str = "its op (logits or embedding) has no FP8 form") -> str:
        """Take checkpoint tensor `name` as a graph weight of `shape` in the compute dtype (or `dtype`: a
        router's correction bias stays float32). An FP8 weight is dequantized, `why_float` saying why."""
        src_dtype = self._spec(name, shape)
        if src_dtype not in _FLOAT_DTYPES:
            hint = ""
            if src_dtype in _FP8_DTYPES | _QUANT_DTYPES["int8"] and name.endswith(".weight"):
                module = name.removesuffix(".weight")
                scheme = self._scheme(module)
                if scheme is not None and len(shape) == 2 and src_dtype in _QUANT_DTYPES[scheme.fmt]:
                    return self._dequantized(name, shape, scheme, why_float)
                hint = ("; it looks like FP8 data but quantization_config does not cover it "
                        f"({'no quantization_config' if not self.quant else 'excluded by its ignore list'})")
            raise CheckpointError(f"{self.checkpoint.path}: tensor {self._actual[name]!r} requires a float dtype; "
                                  f"got {src_dtype}{hint}")
        if name not in self.weights:
            dtype = dtype or self.dtype
            self.weights[name] = self._load(name).to(getattr(torch, dtype)).contiguous()
            self.weight_specs[name] = WeightSpec(dtype, tuple(shape), "none", source=self._actual[name])
        return name

    def has_module(self, prefix: str) -> bool:
        """Whether any checkpoint tensor's canonical name starts with `prefix` ("model.layers.3.linear_attn.")."""
        return any(name.startswith(prefix) for name in self._actual)

    def derived_weight(self, name: str, sources: list[tuple[str, tuple[int, ...]]],
                       make: Callable[[list[torch.Tensor]], torch.Tensor], shape: tuple[int, ...], how: str) -> str:
        """A graph weight computed once from checkpoint tensors (`sources`: canonical name and required
        shape each): `make` gets them in order and returns the weight of `shape`, stored in the compute
        dtype. `how` names the transform in the weight's recorded source (e.g. "stack")."""
        fp8 = {}  # source -> its FP8 scheme: dequantized (bits * scale, float32) before `make`
        for src, src_shape in sources:
            src_dtype = self._spec(src, src_shape)
            scheme = self._scheme(src.removesuffix(".weight")) if src.endswith(".weight") else None
            if scheme is not None and src_dtype in _QUANT_DTYPES[scheme.fmt] and len(src_shape) == 2:
                fp8[src] = scheme
            elif src_dtype not in _FLOAT_DTYPES:
                raise CheckpointError(f"{self.checkpoint.path}: tensor {self._actual[src]!r} requires a float dtype "
                                      f"to build {name}; got {src_dtype}")
        if name not in self.weights:
            w = make([self._dequantized_source(src, shape_, fp8[src]) if src in fp8 else self._load(src)
                      for src, shape_ in sources])
            if fp8:
                self.decide(name, f"{len(fp8)} {next(iter(fp8.values())).tag} source(s) dequantized to {self.dtype}",
                            "its op has no FP8 form yet; dequantized once at compile time")
            assert tuple(w.shape) == tuple(shape), (name, tuple(w.shape), shape)
            self.weights[name] = w.to(getattr(torch, self.dtype)).contiguous()
            shown = [self._actual[src] for src, _ in sources]
            if len(shown) > 4:
                shown = shown[:2] + [f"... {len(shown) - 3} more"] + shown[-1:]
            self.weight_specs[name] = WeightSpec(self.dtype, tuple(shape), "none", source=f"{how}({', '.join(shown)})")
        return name

    def stored(self, name: str) -> tuple[str, tuple[int, ...]] | None:
        """(dtype, shape) of canonical checkpoint tensor `name` as stored, or None if absent."""
        if name not in self._actual:
            return None
        dtype, shape = self.checkpoint.tensors.spec(self._actual[name])
        return dtype, tuple(shape)

    def source(self, name: str) -> str:
        """The checkpoint's own name of canonical tensor `name` (for messages)."""
        return self._actual.get(name, name)

    def read(self, name: str) -> torch.Tensor:
        """Checkpoint tensor `name` as stored (no cast), marked used; the caller has checked it (`stored`)."""
        assert name in self._actual, name
        return self._load(name)

    def add_weight(self, name: str, tensor: torch.Tensor, scheme: str, source: str) -> str:
        """A graph weight the frontend derived from checkpoint tensors (a re-layout), stored as given."""
        assert name not in self.weights, f"{name} already exists"
        self.weights[name] = tensor.contiguous()
        self.weight_specs[name] = WeightSpec(str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), scheme,
                                             source=source)
        return name

    def ignore(self, pattern: str, reason: str) -> None:
        """Mark checkpoint tensors matching regex `pattern` as deliberately unused."""
        for name in self._actual:
            if re.fullmatch(pattern, name):
                self._ignored[name] = reason

    def node(self, op: str, inputs: list[str], name: str, num_outputs: int = 1, **attrs) -> list[str]:
        outputs = [name] if num_outputs == 1 else [f"{name}.{i}" for i in range(num_outputs)]
        self.nodes.append(Node(name, op, list(inputs), outputs, attrs))
        return outputs

    def decide(self, node: str, action: str, reason: str) -> None:
        self.decisions.append({"pass": "frontend", "node": node, "action": action, "reason": reason})

    # ------------------------------------------------------------ linears, float or FP8

    def quantized_scheme(self, prefix: str) -> LinearScheme | None:
        """The 8-bit scheme the checkpoint stores module `prefix`'s weight in, or None (float)."""
        return self._scheme(prefix)

    def linear(self, x: str, prefix: str, out_features: int, in_features: int, has_bias: bool, name: str,
               allow_fp8: bool = True, reorder_rows: Callable | None = None) -> str:
        """y = x @ W.T (+ b) for checkpoint module `prefix`: `linear`, or `linear_fp8` / `linear_int8` when the
        quantization_config covers the module and `allow_fp8` (an MoE router is float: it picks experts
        discretely, and checkpoints keep it in bf16 whatever their quantization_config says).
        `reorder_rows([t])`: a permutation of the output rows applied once to a quantized weight, its
        per-channel scale and the bias (a row permutation commutes with per-channel and per-tensor scales)."""
        scheme = self._scheme(prefix) if allow_fp8 else None
        if scheme is None:
            assert reorder_rows is None, "reorder_rows is for quantized weights; a float one is a derived_weight"
            ins = [x, self.weight(f"{prefix}.weight", (out_features, in_features))]
        else:
            assert reorder_rows is None or scheme.weight_scheme in ("channel", "tensor"), scheme.tag
            ins = [x, self._fp8_weight(f"{prefix}.weight", (out_features, in_features), scheme),
                   self._weight_scale(prefix, scheme, out_features, in_features)]
            if reorder_rows is not None:
                self.weights[ins[1]] = reorder_rows([self.weights[ins[1]]]).contiguous()
                if scheme.weight_scheme == "channel":
                    self.weights[ins[2]] = reorder_rows([self.weights[ins[2]][:, None]]).contiguous()
            act = scheme.act_scheme
            if scheme.act_note:
                self.decide(name, f"activations {act}", scheme.act_note)
            if act == "static":
                input_scale = self._input_scale(prefix, scheme)
                if input_scale is None:
                    act = "dynamic_group" if scheme.weight_scheme == "block" else "dynamic_token"
                    self.decide(name, f"activations {act} (static declared, no input scale)",
                                f"activation_scheme static but the checkpoint has no "
                                f"{' or '.join(prefix + '.' + s for s in scheme.input_scale_names)}; "
                                f"activations are quantized at run time instead")
                else:
                    ins.append(input_scale)
            elif any(f"{prefix}.{s}" in self._actual for s in scheme.input_scale_names):
                for s in scheme.input_scale_names:
                    self.ignore(re.escape(f"{prefix}.{s}"), f"activations are {act}: the static input scale "
                                "is not used")
        if has_bias:
            ins.append(self.weight(f"{prefix}.bias", (out_features,)))
            if reorder_rows is not None:
                self.weights[ins[-1]] = reorder_rows([self.weights[ins[-1]][:, None]]).contiguous()
        if scheme is None:
            return self.node("linear", ins, name)[0]
        if scheme.fmt == "int8":
            self._zero_points(prefix)
            return self.node("linear_int8", ins, name, weight_scheme=scheme.weight_scheme, act_scheme=act,
                             has_bias=has_bias)[0]
        return self.node("linear_fp8", ins, name, weight_scheme=scheme.weight_scheme, act_scheme=act,
                         fp8_format="e4m3fn", block_size=list(scheme.block_size) if scheme.block_size else None,
                         has_bias=has_bias)[0]

    def _scheme(self, module: str) -> LinearScheme | None:
        if self.quant is None:
            return None
        names = {module, self._actual.get(module + ".weight", module).removesuffix(".weight")}
        return self.quant.scheme_for(*sorted(names))

    def _zero_points(self, prefix: str) -> None:
        """A symmetric int8 checkpoint may store zero points anyway (all 0): read, checked, and not used."""
        name = f"{prefix}.weight_zero_point"
        if name in self._actual:
            zeros = self._load(name)
            if bool((zeros != 0).any()):
                raise CheckpointError(f"{self.checkpoint.path}: tensor {self._actual[name]!r} requires zeros "
                                      "(symmetric int8 weights); got non-zero zero points; asymmetric int8 is not "
                                      "supported")

    def _int8_weight(self, name: str, shape: tuple[int, ...], scheme: LinearScheme) -> str:
        src_dtype = self._spec(name, shape)
        if src_dtype != "int8":
            raise CheckpointError(f"{self.checkpoint.path}: tensor {self._actual[name]!r} requires int8 data (I8) "
                                  f"for quantization_config scheme {scheme.tag}; got {src_dtype}; list the module in "
                                  "ignore if it is meant to be float")
        self.weights[name] = self._load(name).contiguous()
        self.weight_specs[name] = WeightSpec("int8", tuple(shape), scheme.tag, source=self._actual[name])
        return name

    def _fp8_weight(self, name: str, shape: tuple[int, ...], scheme: LinearScheme) -> str:
        if scheme.fmt == "int8":
            return self._int8_weight(name, shape, scheme)
        src_dtype = self._spec(name, shape)
        if src_dtype not in _FP8_DTYPES:
            raise CheckpointError(f"{self.checkpoint.path}: tensor {self._actual[name]!r} requires FP8 data "
                                  f"(F8_E4M3 or U8) for quantization_config scheme {scheme.tag}; got {src_dtype}; "
                                  "list the module in modules_to_not_convert/ignore if it is meant to be float")
        bits = self._load(name)
        if bits.dtype == torch.uint8:
            bits = bits.view(torch.float8_e4m3fn)  # reinterpret the bytes; converting values would be wrong
            self.decide(name, "uint8 bits read as float8_e4m3fn", "the checkpoint stores FP8 weights untyped; "
                        "reinterpreted, not converted")
        u8 = bits.view(torch.uint8)
        num_nan = int(((u8 & 0x7F) == 0x7F).sum())
        if num_nan:
            raise CheckpointError(f"{self.checkpoint.path}: tensor {self._actual[name]!r} holds {num_nan} FP8 NaN "
                                  "values (0x7F/0xFF); the checkpoint is corrupt or not e4m3fn")
        self.weights[name] = bits.contiguous()
        self.weight_specs[name] = WeightSpec("float8_e4m3fn", tuple(shape), scheme.tag, source=self._actual[name])
        return name

    def _scale_tensor(self, prefix: str, suffixes: tuple[str, ...], what: str) -> tuple[str, torch.Tensor] | None:
        present = [s for s in suffixes if f"{prefix}.{s}" in self._actual]
        if len(present) > 1:
            raise CheckpointError(f"{self.checkpoint.path}: module {prefix!r} has both "
                                  f"{' and '.join(present)}; requires one {what}")
        if not present:
            return None
        src = f"{prefix}.{present[0]}"
        dtype, _ = self.checkpoint.tensors.spec(self._actual[src])
        if dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{self.checkpoint.path}: tensor {self._actual[src]!r} ({what}) requires a float "
                                  f"dtype; got {dtype} (e8m0/ue8m0 scales are not supported yet)")
        scale = self._load(src).float()  # bf16/fp16 -> fp32 is exact
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise CheckpointError(f"{self.checkpoint.path}: tensor {self._actual[src]!r} ({what}) requires finite "
                                  f"positive values; got min {scale.min().item():g}, max {scale.max().item():g}")
        return src, scale

    def _weight_scale(self, prefix: str, scheme: LinearScheme, n: int, k: int) -> str:
        found = self._scale_tensor(prefix, scheme.weight_scale_names, "weight scale")
        if found is None:
            raise CheckpointError(f"{self.checkpoint.path}: missing tensor "
                                  f"{' or '.join(prefix + '.' + s for s in scheme.weight_scale_names)} "
                                  f"(the {scheme.tag} weight scale of {prefix})")
        src, scale = found
        if scheme.weight_scheme == "tensor":
            ok, expected = scale.numel() == 1, "[] or [1]"
        elif scheme.weight_scheme == "channel":
            ok, expected = tuple(scale.shape) in ((n,), (n, 1)), f"[{n}, 1] or [{n}]"
        else:
            bn, bk = scheme.block_size
            grid = (-(-n // bn), -(-k // bk))
            ok, expected = tuple(scale.shape) == grid, str(list(grid))
        if not ok:
            raise CheckpointError(f"{self.checkpoint.path}: tensor {self._actual[src]!r} requires shape {expected} "
                                  f"for scheme {scheme.tag} of a [{n}, {k}] weight; got {list(scale.shape)}")
        if scheme.weight_scheme != "block":
            scale = scale.reshape(-1)  # [1] or [N]
        name = f"{prefix}.weight_scale"
        self.weights[name] = scale.contiguous()
        self.weight_specs[name] = WeightSpec("float32", tuple(scale.shape), f"{scheme.tag.split('-')[0]}-scale",
                                             source=self._actual[src])
        return name

    def _input_scale(self, prefix: str, scheme: LinearScheme) -> str | None:
        found = self._scale_tensor(prefix, scheme.input_scale_names, "static input scale")
        if found is None:
            return None
        src, scale = found
        if scale.numel() != 1:
            raise CheckpointError(f"{self.checkpoint.path}: tensor {self._actual[src]!r} requires one value "
                                  f"(a per-tensor static input scale); got shape {list(scale.shape)}")
        name = f"{prefix}.input_scale"
        self.weights[name] = scale.reshape(1).contiguous()
        self.weight_specs[name] = WeightSpec("float32", (1,), "fp8-input-scale", source=self._actual[src])
        return name

    def fp8_scheme(self, module: str) -> LinearScheme | None:
        """The quantization_config scheme of checkpoint module `module` if its weight is stored as FP8 data."""
        stored = self.stored(f"{module}.weight")
        return self._scheme(module) if stored is not None and stored[0] in _FP8_DTYPES else None

    def fp8_bits_and_scale(self, module: str, shape: tuple[int, int],
                           scheme: LinearScheme) -> tuple[torch.Tensor, torch.Tensor]:
        """An FP8 linear's bits (float8_e4m3fn) and its weight scale as stored, both checked and consumed, for a
        weight the frontend re-lays out (stacked experts); neither becomes a graph weight here."""
        bits = self.weights.pop(self._fp8_weight(f"{module}.weight", shape, scheme))
        del self.weight_specs[f"{module}.weight"]
        scale_name = self._weight_scale(module, scheme, *shape)
        scale = self.weights.pop(scale_name)
        del self.weight_specs[scale_name]
        return bits, scale

    def _dequantized_source(self, name: str, shape: tuple[int, ...], scheme: LinearScheme) -> torch.Tensor:
        """An FP8 checkpoint weight times its scale, float32 (its scale tensor is consumed)."""
        from rdnac.ir.fp8 import dequantize_weight

        bits = self.weights.pop(self._fp8_weight(name, shape, scheme))
        del self.weight_specs[name]
        if scheme.fmt == "int8":
            self._zero_points(name.removesuffix(".weight"))
        scale_name = self._weight_scale(name.removesuffix(".weight"), scheme, *shape)
        scale = self.weights.pop(scale_name)
        del self.weight_specs[scale_name]
        return dequantize_weight(bits, scale, scheme.weight_scheme, scheme.block_size)

    def _dequantized(self, name: str, shape: tuple[int, ...], scheme: LinearScheme,
                     why: str = "its op (logits or embedding) has no FP8 form") -> str:
        """An FP8 weight that feeds an op without an FP8 form (logits, embedding): dequantized once here."""
        from rdnac.ir.fp8 import dequantize_weight

        module = name.removesuffix(".weight")
        bits = self.weights.pop(self._fp8_weight(name, shape, scheme))
        if scheme.fmt == "int8":
            self._zero_points(module)
        scale_name = self._weight_scale(module, scheme, *shape)
        scale = self.weights.pop(scale_name)
        del self.weight_specs[scale_name]
        for s in scheme.input_scale_names:
            self.ignore(re.escape(f"{module}.{s}"), "the weight is dequantized; its op takes float activations")
        w = dequantize_weight(bits, scale, scheme.weight_scheme, scheme.block_size)
        self.weights[name] = w.to(getattr(torch, self.dtype)).contiguous()
        self.weight_specs[name] = WeightSpec(self.dtype, tuple(shape), "none", source=self._actual[name])
        self.decide(name, f"dequantized {scheme.tag} weight to {self.dtype}", why)
        return name

    def finish(self, outputs: list[str], attrs: dict) -> tuple[Graph, dict[str, torch.Tensor]]:
        unused = sorted(self._actual[n] for n in self._names - self._consumed - set(self._ignored))
        if unused:
            shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
            raise CheckpointError(f"{self.checkpoint.path}: {len(unused)} checkpoint tensor(s) not used by the "
                                  f"{attrs.get('architecture')} graph: {shown}; the checkpoint does not match its config")
        for name, reason in sorted(self._ignored.items()):
            self.decisions.append({"pass": "frontend", "node": self._actual[name], "action": "ignored tensor",
                                   "reason": reason})
        graph = Graph(self.inputs, self.weight_specs, self.nodes, outputs, attrs, list(self.state))
        return graph, self.weights


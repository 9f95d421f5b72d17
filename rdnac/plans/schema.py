"""A plan checked as data before anything reads it: the type and shape of every field the loader uses.

`read_plan` (format.py) calls `check_header` and `check_body` right after the
format version and body hash checks. A plan is msgpack: any field can hold any
type, and a plan edited by hand, damaged in a way the hash cannot see (the
header), or written by another rdnac must be refused with one `PlanError`
naming the field ("body.graph.nodes[3].attrs.num_heads requires an int >= 1;
got 'six'"), never a TypeError from deep inside the runtime. Node attributes
are typed by the annotations of their op's reference function (`ir/ops.py`,
the IR's living definition), so a new op or attribute needs nothing here.
The graph's structure (inputs defined before use, shapes, op arities) is then
`ir/verify.py`'s job, run by `Plan.graph()`.
"""

from __future__ import annotations

import inspect
import math
from functools import lru_cache
from pathlib import Path

from rdnac.errors import PlanError
from rdnac.ir.state import KINDS

DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool",
          "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2")
# The runtime's step inputs (ir/graph.py); every other graph input must be a declared state.
STEP_INPUTS = ("token_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "cu_seqlens_q",
               "logits_indices", "state_slots")
KV_BLOCK_SIZES = (8, 16, 32, 64)  # what compile offers (pipeline.CompileOptions)
_MAX_DIM = 1 << 40  # no real dimension, count or size is near this; an absurd value is corruption
_Missing = object()


class _Checker:
    """Raises PlanError naming the plan file and the dotted field; `got` is shown short."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, requirement: str, value) -> None:
        shown = "nothing (missing)" if value is _Missing else _show(value)
        raise PlanError(f"{self.path}: {where} requires {requirement}; got {shown}; the plan file is corrupt or "
                        f"was written by another rdnac; recompile it")

    def field(self, d: dict, key: str, where: str):
        """d[key], or the marker that makes the next check say the field is missing."""
        return d.get(key, _Missing)

    def dict(self, value, where: str) -> dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            self.fail(where, "a map with string keys", value)
        return value

    def list(self, value, where: str) -> list:
        if not isinstance(value, list):
            self.fail(where, "a list", value)
        return value

    def str(self, value, where: str, *, choices=None, optional: bool = False) -> str | None:
        if optional and value is None:
            return None
        if not isinstance(value, str):
            self.fail(where, "a string" + (" or nil" if optional else ""), value)
        if choices is not None and value not in choices:
            self.fail(where, f"one of {', '.join(map(repr, choices))}", value)
        return value

    def int(self, value, where: str, *, low: int = 0, optional: bool = False) -> int | None:
        if optional and value is None:
            return None
        if not _is_int(value) or not low <= value < _MAX_DIM:
            self.fail(where, f"an integer >= {low}" + (" or nil" if optional else ""), value)
        return value

    def bool(self, value, where: str) -> bool:
        if not isinstance(value, bool):
            self.fail(where, "true or false", value)
        return value

    def strs(self, value, where: str) -> list[str]:
        for i, s in enumerate(self.list(value, where)):
            self.str(s, f"{where}[{i}]")
        return value

    def bytes(self, value, where: str) -> bytes:
        if not isinstance(value, bytes):
            self.fail(where, "binary data", value)
        return value


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _show(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


# ---------------------------------------------------------------- header


def check_header(path: Path, header) -> None:
    c = _Checker(path)
    c.dict(header, "header")
    for key in ("target", "rdnac_version", "torch_version"):
        c.str(c.field(header, key, "header"), f"header.{key}")
    c.str(c.field(header, "triton_version", "header"), "header.triton_version", optional=True)
    for key in ("model", "compile_options", "target_info"):
        c.dict(c.field(header, key, "header"), f"header.{key}")
    if c.field(header, "capabilities", "header") is not None:  # nil for the cpu target
        c.dict(c.field(header, "capabilities", "header"), "header.capabilities")
    for key in ("name", "architecture", "format", "path", "config_sha256"):
        c.str(c.field(header["model"], key, "header.model"), f"header.model.{key}")
    c.int(c.field(header, "created_unix", "header"), "header.created_unix")
    _check_weights_record(c, c.field(header, "weights", "header"), "header.weights")
    if "mesh" in header:  # a sharded plan (--tp N): one weights file per rank
        mesh = c.dict(header["mesh"], "header.mesh")
        num_ranks = c.int(c.field(mesh, "tp", "header.mesh"), "header.mesh.tp")
        ranks = c.field(mesh, "ranks", "header.mesh")
        if not isinstance(ranks, list) or len(ranks) != num_ranks or num_ranks < 2:
            c.fail("header.mesh.ranks", f"a list of {num_ranks} weights records (tp >= 2)", ranks)
        for r, record in enumerate(ranks):
            _check_weights_record(c, record, f"header.mesh.ranks[{r}]")


def _check_weights_record(c, weights, where: str) -> None:
    weights = c.dict(weights, where)
    name = c.str(c.field(weights, "file", where), f"{where}.file")
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        c.fail(f"{where}.file", "a plain file name next to the plan (no directories)", name)
    c.int(c.field(weights, "size", where), f"{where}.size")
    c.str(c.field(weights, "sha256", where), f"{where}.sha256")
    if "tensors" in weights:  # per-tensor checksums (weights_file.record_weights); older plans have none
        c.str(c.field(weights, "checksum", where), f"{where}.checksum")
        for tensor, digest in c.dict(weights["tensors"], f"{where}.tensors").items():
            c.str(digest, f"{where}.tensors[{tensor!r}]")


# ---------------------------------------------------------------- body


def check_body(path: Path, body) -> None:
    c = _Checker(path)
    c.dict(body, "body")
    _check_graph(c, c.field(body, "graph", "body"))
    _check_runtime(c, c.field(body, "runtime", "body"), body["graph"]["attrs"])
    decisions = c.list(body.get("decisions", []), "body.decisions")
    for i, d in enumerate(decisions):
        c.dict(d, f"body.decisions[{i}]")
        for key in ("pass", "node", "action", "reason"):
            c.str(c.field(d, key, f"body.decisions[{i}]"), f"body.decisions[{i}].{key}")
    tokenizer = c.dict(c.field(body, "tokenizer", "body"), "body.tokenizer")
    c.str(c.field(tokenizer, "json", "body.tokenizer"), "body.tokenizer.json", optional=True)
    config = c.field(tokenizer, "config", "body.tokenizer")
    if config is not None:
        _check_tokenizer_config(c, config)
    c.str(body.get("chat_template"), "body.chat_template", optional=True)
    _check_generation_config(c, body.get("generation_config") or {})
    kernels = c.list(body.get("kernels") or [], "body.kernels")
    for i, k in enumerate(kernels):
        _check_kernel(c, k, f"body.kernels[{i}]")
    if kernels:
        _check_program(c, c.field(body, "program", "body"), body["graph"]["nodes"])


def _check_graph(c: _Checker, graph) -> None:
    c.dict(graph, "body.graph")
    for name, spec in c.dict(c.field(graph, "inputs", "body.graph"), "body.graph.inputs").items():
        where = f"body.graph.inputs.{name}"
        c.str(c.field(c.dict(spec, where), "dtype", where), f"{where}.dtype", choices=DTYPES)
        for i, d in enumerate(c.list(c.field(spec, "shape", where), f"{where}.shape")):
            if not isinstance(d, str):
                c.int(d, f"{where}.shape[{i}]")
    for name, spec in c.dict(c.field(graph, "weights", "body.graph"), "body.graph.weights").items():
        where = f"body.graph.weights.{name}"
        c.str(c.field(c.dict(spec, where), "dtype", where), f"{where}.dtype", choices=DTYPES)
        for i, d in enumerate(c.list(c.field(spec, "shape", where), f"{where}.shape")):
            c.int(d, f"{where}.shape[{i}]")
        c.str(spec.get("scheme", "none"), f"{where}.scheme")
        c.str(spec.get("source", ""), f"{where}.source")
    names = set()
    for i, node in enumerate(c.list(c.field(graph, "nodes", "body.graph"), "body.graph.nodes")):
        where = f"body.graph.nodes[{i}]"
        c.dict(node, where)
        name = c.str(c.field(node, "name", where), f"{where}.name")
        if name in names:
            c.fail(f"{where}.name", "a name no other node has", name)
        names.add(name)
        op = c.str(c.field(node, "op", where), f"{where}.op", choices=tuple(_op_attrs()))
        c.strs(c.field(node, "inputs", where), f"{where}.inputs")
        c.strs(c.field(node, "outputs", where), f"{where}.outputs")
        _check_attrs(c, op, c.dict(c.field(node, "attrs", where), f"{where}.attrs"), f"{where}.attrs")
    if c.strs(c.field(graph, "outputs", "body.graph"), "body.graph.outputs") != ["logits"]:
        c.fail("body.graph.outputs", "['logits'] (the runtime reads the logits)", graph["outputs"])
    attrs = c.dict(c.field(graph, "attrs", "body.graph"), "body.graph.attrs")
    c.int(c.field(attrs, "vocab_size", "body.graph.attrs"), "body.graph.attrs.vocab_size", low=1)
    for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                "max_position_embeddings"):
        if key in attrs:
            c.int(attrs[key], f"body.graph.attrs.{key}")
    c.str(attrs.get("dtype", "float32"), "body.graph.attrs.dtype", choices=DTYPES)
    state_names = set()
    for i, s in enumerate(c.list(c.field(graph, "state", "body.graph"), "body.graph.state")):
        where = f"body.graph.state[{i}]"
        c.dict(s, where)
        state_names.add(c.str(c.field(s, "name", where), f"{where}.name"))
        c.str(c.field(s, "kind", where), f"{where}.kind")  # an unknown kind is refused by ir/state.py, naming it
        c.int(c.field(s, "layer", where), f"{where}.layer")
        c.str(c.field(s, "dtype", where), f"{where}.dtype")
        for j, d in enumerate(c.list(c.field(s, "shape", where), f"{where}.shape")):
            c.int(d, f"{where}.shape[{j}]", low=1)
        if s["name"] not in graph["inputs"]:
            c.fail(f"{where}.name", "the name of a graph input (the state feeds it)", s["name"])
        if s["kind"] not in KINDS:
            continue  # Plan.graph() refuses it naming the kind (a plan from a newer rdnac)
        prefix = ["NB", "BS"] if KINDS[s["kind"]] == "token" else ["NS"]
        if graph["inputs"][s["name"]]["shape"] != prefix + s["shape"]:
            c.fail(f"{where}.shape", f"the shape of graph input {s['name']} after {prefix} "
                                     f"({graph['inputs'][s['name']]['shape']})", s["shape"])
    for name in graph["inputs"]:
        if name not in STEP_INPUTS and name not in state_names:
            c.fail(f"body.graph.inputs.{name}", f"a step input ({', '.join(STEP_INPUTS)}) or a declared state",
                   name)


@lru_cache(maxsize=1)
def _op_attrs() -> dict[str, tuple[dict[str, str], bool]]:
    """op -> ({attribute: annotation} of its reference's keyword parameters, whether it takes **attrs)."""
    from rdnac.ir.ops import OPS

    out = {}
    for name, op in OPS.items():
        params = inspect.signature(op.reference).parameters.values()
        out[name] = ({p.name: str(p.annotation) for p in params if p.kind == p.KEYWORD_ONLY},
                     any(p.kind == p.VAR_KEYWORD for p in params))
    return out


@lru_cache(maxsize=1)
def _all_attrs() -> dict[str, str]:
    """attribute -> annotation over every op: what an op that forwards **attrs (attention_quant) passes on."""
    return {k: v for attrs, _ in _op_attrs().values() for k, v in attrs.items()}


def _check_attrs(c: _Checker, op: str, attrs: dict, where: str) -> None:
    declared, takes_any = _op_attrs()[op]
    for key, value in attrs.items():
        annotation = declared.get(key) or (_all_attrs().get(key) if takes_any else None)
        if annotation is None:
            if not takes_any:
                c.fail(f"{where}.{key}", f"an attribute op {op} has ({', '.join(declared) or 'none'})", key)
            continue
        _check_attr(c, key, value, annotation, f"{where}.{key}")


def _check_attr(c: _Checker, key: str, value, annotation: str, where: str) -> None:
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return
    kind = kinds[0].split("[")[0]
    if kind == "int":
        # counts and sizes (num_heads, head_dim, rotary_dim, top_k) are >= 1; windows and groups may be 0
        c.int(value, where, low=1 if key.startswith(("num_", "head_", "rotary_", "top_")) else 0)
    elif kind == "float":
        if not _is_number(value):
            c.fail(where, "a number", value)
    elif kind == "bool":
        c.bool(value, where)
    elif kind == "str":
        c.str(value, where, choices=DTYPES if key.endswith("dtype") else None)
    elif kind in ("list", "tuple"):
        for i, x in enumerate(c.list(value, where)):
            c.int(x, f"{where}[{i}]")
    elif kind == "dict":
        _check_plain(c, c.dict(value, where), where)
        if key == "scaling":
            _check_rope_scaling(c, value, where)
    else:
        raise AssertionError(f"reference annotation {annotation!r} of attribute {key} has no check here")


def _check_plain(c: _Checker, d: dict, where: str) -> None:
    """A map of scalars (rope scaling parameters): finite numbers, strings, booleans, nil."""
    for key, value in d.items():
        if not (value is None or isinstance(value, (str, bool)) or (_is_number(value) and math.isfinite(value))):
            c.fail(f"{where}.{key}", "a finite number, a string, a boolean or nil", value)


def _check_rope_scaling(c: _Checker, scaling: dict, where: str) -> None:
    from rdnac.ir.rope_math import SCALING_KEYS

    if not scaling:
        return  # an empty map is no scaling
    kind = c.str(c.field(scaling, "rope_type", where), f"{where}.rope_type", choices=tuple(SCALING_KEYS))
    for key in SCALING_KEYS[kind]:
        value = c.field(scaling, key, where)
        if not _is_number(value) or not value > 0:
            c.fail(f"{where}.{key}", "a positive number", value)


def _check_runtime(c: _Checker, rt, model: dict) -> None:
    c.dict(rt, "body.runtime")
    block_size = c.field(rt, "kv_block_size", "body.runtime")
    if block_size not in KV_BLOCK_SIZES or isinstance(block_size, bool):
        c.fail("body.runtime.kv_block_size", f"one of {', '.join(map(str, KV_BLOCK_SIZES))}", block_size)
    max_len = c.int(c.field(rt, "max_model_len", "body.runtime"), "body.runtime.max_model_len", low=1)
    if max_len > model.get("max_position_embeddings", max_len):
        c.fail("body.runtime.max_model_len", f"at most the model's positions ({model['max_position_embeddings']})",
               max_len)
    for key in ("max_num_seqs", "max_num_batched_tokens"):
        c.int(rt.get(key), f"body.runtime.{key}", low=1, optional=True)
    c.str(rt.get("device", "cpu"), "body.runtime.device", choices=("cpu", "cuda"))
    for key in ("pdl", "early_meta", "early_weights"):
        c.bool(rt.get(key, False), f"body.runtime.{key}")


def _check_tokenizer_config(c: _Checker, config) -> None:
    c.dict(config, "body.tokenizer.config")
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):  # an AddedToken dict: its content is the token
            c.str(value.get("content"), f"body.tokenizer.config.{key}.content", optional=True)
        else:
            c.str(value, f"body.tokenizer.config.{key}", optional=True)


def _check_generation_config(c: _Checker, gen) -> None:
    c.dict(gen, "body.generation_config")
    for key in ("temperature", "top_p", "min_p", "repetition_penalty"):
        value = gen.get(key)
        if value is not None and not (_is_number(value) and math.isfinite(value)):
            c.fail(f"body.generation_config.{key}", "a finite number or nil", value)
    if gen.get("top_k") is not None and not _is_int(gen["top_k"]):
        c.fail("body.generation_config.top_k", "an integer or nil", gen["top_k"])
    if gen.get("do_sample") is not None:
        c.bool(gen["do_sample"], "body.generation_config.do_sample")
    eos = gen.get("eos_token_id")
    for i, t in enumerate(eos if isinstance(eos, list) else [eos] if eos is not None else []):
        c.int(t, f"body.generation_config.eos_token_id[{i}]" if isinstance(eos, list)
              else "body.generation_config.eos_token_id")


def _check_kernel(c: _Checker, k, where: str) -> None:
    c.dict(k, where)
    c.int(c.field(k, "format_version", where), f"{where}.format_version")
    for key in ("kernel", "key", "target", "triton_version", "source_hash", "binary_ext", "sha256"):
        c.str(c.field(k, key, where), f"{where}.{key}")
    c.bytes(c.field(k, "binary", where), f"{where}.binary")
    c.dict(c.field(k, "metadata", where), f"{where}.metadata")
    call = c.dict(c.field(k, "call", where), f"{where}.call")
    c.str(c.field(call, "kernel", f"{where}.call"), f"{where}.call.kernel")
    for arg, ty in c.dict(c.field(call, "signature", f"{where}.call"), f"{where}.call.signature").items():
        c.str(ty, f"{where}.call.signature.{arg}")
        if not ty:
            c.fail(f"{where}.call.signature.{arg}", "a Triton type", ty)
    c.dict(c.field(call, "constexprs", f"{where}.call"), f"{where}.call.constexprs")
    for key in ("num_warps", "num_stages"):
        c.int(c.field(call, key, f"{where}.call"), f"{where}.call.{key}", low=1)
    for key, kind, prefixes in (("aligned", "pointer", ("*",)), ("divisible", "integer", ("i", "u"))):
        names = c.strs(c.field(call, key, f"{where}.call"), f"{where}.call.{key}")
        for name in names:
            if not call["signature"].get(name, "").startswith(prefixes):
                c.fail(f"{where}.call.{key}", f"names of the kernel signature's {kind} arguments", name)
    res = c.dict(c.field(k, "resources", where), f"{where}.resources")
    for key in ("shared_bytes", "num_spills"):
        c.int(c.field(res, key, f"{where}.resources"), f"{where}.resources.{key}")
    for key in ("num_regs", "num_sgprs"):
        c.int(c.field(res, key, f"{where}.resources"), f"{where}.resources.{key}", optional=True)
    c.strs(c.field(res, "matrix_instructions", f"{where}.resources"), f"{where}.resources.matrix_instructions")


def _check_program(c: _Checker, program, nodes: list) -> None:
    """Every node with a kernel has one choice per step key, the same keys for every node."""
    c.dict(program, "body.program")
    keys = None
    for node in nodes:
        if node["op"] != "split" and node["name"] not in program:  # split is a view (registry.VIEW_OPS)
            c.fail(f"body.program.{node['name']}", "a kernel choice for every node of the graph", _Missing)
    for name, steps in program.items():
        if keys is None:
            keys = set(c.dict(steps, f"body.program.{name}"))
        if set(c.dict(steps, f"body.program.{name}")) != keys:
            c.fail(f"body.program.{name}", f"the step keys of every other node ({len(keys)})", sorted(steps))
        for key, choice in c.dict(steps, f"body.program.{name}").items():
            where = f"body.program.{name}.{key}"
            c.str(c.field(c.dict(choice, where), "kernel", where), f"{where}.kernel")
            config = c.dict(c.field(choice, "config", where), f"{where}.config")
            c.dict(c.field(config, "constexprs", f"{where}.config"), f"{where}.config.constexprs")
            for key in ("num_warps", "num_stages"):
                c.int(c.field(config, key, f"{where}.config"), f"{where}.config.{key}", low=1)

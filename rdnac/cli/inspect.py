"""`rdnac inspect`: a summary of a plan, as a dict (for --json) and as rich text."""

from __future__ import annotations

import re

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rdnac.cli.inspect_moe import moe_summary, render_moe
from rdnac.errors import RdnacError
from rdnac.ir.state import bytes_per_sequence, bytes_per_token
from rdnac.plans import read_plan

DEFAULT_MEMORY = 16 << 30  # what `inspect` sizes the state for unless given --memory
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}

_ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1,
                  "float8_e4m3fn": 1, "float8_e4m3fnuz": 1}


def parse_memory(text: str) -> int:
    """Bytes of "16GiB", "80GB", "512MiB" or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise RdnacError(f"--memory requires a size such as 16GiB, 80GB or 512MiB; got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def state_summary(graph, runtime: dict, weight_bytes: int, memory: int) -> dict:
    """The state the plan declares, per layer, and what `memory` bytes of device memory hold of it once the
    weights are in: tokens of paged state, with one slot of per-sequence state for each of max_num_seqs."""
    per_token, per_sequence = bytes_per_token(graph.state), bytes_per_sequence(graph.state)
    num_slots = (runtime.get("max_num_seqs") or 1) if per_sequence else 0
    budget = max(0, memory - weight_bytes - num_slots * per_sequence)
    return {
        "entries": [{**spec.to_dict(), "per": spec.per, "bytes": spec.nbytes} for spec in graph.state],
        "bytes_per_token": per_token,
        "bytes_per_sequence": per_sequence,
        "memory_bytes": memory,
        "sequence_slots": num_slots,
        "max_concurrent_tokens": budget // per_token if per_token else None,
    }


def summarize(plan_path, memory: int = DEFAULT_MEMORY) -> dict:
    plan = read_plan(plan_path)
    graph = plan.graph()
    weight_bytes = 0
    for w in graph.weights.values():
        n = 1
        for d in w.shape:
            n *= d
        weight_bytes += n * _ELEMENT_BYTES.get(w.dtype, 4)
    return {
        "plan": str(plan.path),
        "header": plan.header,
        "model": {**plan.header["model"], **graph.attrs},
        "graph": {"num_nodes": len(graph.nodes), "ops": graph.op_counts(), "inputs": list(graph.inputs),
                  "outputs": graph.outputs},
        "weights": {"count": len(graph.weights), "bytes": weight_bytes,
                    "file": plan.header["weights"]["file"], "file_bytes": plan.header["weights"]["size"]},
        "kernels": [_kernel_summary(k) for k in plan.body.get("kernels", [])],
        "program": _program_summary(plan.body.get("program") or {}),
        "runtime": plan.body["runtime"],
        "state": state_summary(graph, plan.body["runtime"], weight_bytes, memory),
        "moe": moe_summary(graph, plan.body.get("program") or {}, plan.body.get("kernels", [])),
        "has_chat_template": bool(plan.body.get("chat_template")),
        "decisions": plan.body["decisions"],
    }


def _kernel_summary(k: dict) -> dict:
    r, call = k["resources"], k["call"]
    return {"kernel": k["kernel"], "key": k["key"], "target": k["target"], "triton_version": k["triton_version"],
            "constexprs": call["constexprs"], "num_warps": call["num_warps"], "num_stages": call["num_stages"],
            "shared_bytes": r["shared_bytes"], "registers": r["num_regs"], "spills": r["num_spills"],
            "matrix_instructions": r["matrix_instructions"], "binary_bytes": len(k["binary"]), "sha256": k["sha256"]}


def _program_summary(program: dict) -> list[dict]:
    """Per node: the wrapper and config chosen at the smallest decode step and the largest prefill step."""
    out = []
    for node, choices in program.items():
        decode = [k for k in choices if k.startswith("decode:")]
        prefill = [k for k in choices if k.startswith("prefill:")]
        entry = {"node": node}
        for label, keys in (("decode", decode[:1]), ("prefill", prefill[-1:])):
            if keys:
                c = choices[keys[0]]
                entry[label] = {"step": keys[0], "kernel": c["kernel"], "config": c["config"]}
        out.append(entry)
    return out


def _config_text(c: dict) -> str:
    consts = " ".join(f"{k}={v}" for k, v in c["constexprs"].items())
    return f"{consts} w{c['num_warps']} s{c['num_stages']}"


def render_text(s: dict, show_decisions: bool = False) -> None:
    console = Console()
    h, m = s["header"], s["model"]
    console.print(f"[bold]{s['plan']}[/bold]  rdnac {h['rdnac_version']}  target [bold]{h['target']}[/bold]")
    console.print(f"model {m['name']} ({m['architecture']}, {m['format']}): {m['num_layers']} layers, hidden "
                  f"{m['hidden_size']}, heads {m['num_heads']}/{m['num_kv_heads']} x {m['head_dim']}, vocab "
                  f"{m['vocab_size']}, dtype {m['dtype']}")
    console.print(f"weights: {s['weights']['count']} tensors, {s['weights']['bytes'] / 2**20:.1f} MiB "
                  f"({s['weights']['file']})   max model len {s['runtime']['max_model_len']}, "
                  f"KV block {s['runtime']['kv_block_size']}")
    _render_state(console, s["state"], s["weights"]["bytes"])
    table = Table(title=f"graph: {s['graph']['num_nodes']} nodes")
    table.add_column("op")
    table.add_column("count", justify="right")
    for op, n in sorted(s["graph"]["ops"].items(), key=lambda kv: -kv[1]):
        table.add_row(op, str(n))
    console.print(table)
    if s["program"]:
        pt = Table(title="program (node: kernel and config at decode T=1 / largest prefill step)")
        for col in ("node", "kernel", "decode config", "prefill config"):
            pt.add_column(col, overflow="fold")
        for e in s["program"]:
            d, p = e.get("decode"), e.get("prefill")
            pt.add_row(e["node"], (d or p)["kernel"].replace("_decode", "_*") if d and p and d["kernel"] != p["kernel"]
                       else (d or p)["kernel"], _config_text(d["config"]) if d else "-",
                       _config_text(p["config"]) if p else "-")
        console.print(pt)
    if s["kernels"]:
        kt = Table(title=f"kernels: {len(s['kernels'])} binaries for {h['target']} (Triton {h['triton_version']})")
        for col in ("kernel", "config", "shared", "regs", "spills", "matrix instructions"):
            kt.add_column(col, overflow="fold")
        for k in s["kernels"]:
            kt.add_row(k["kernel"].removeprefix("rdnac.kernels."), _config_text(k), str(k["shared_bytes"]),
                       str(k["registers"]), str(k["spills"]), ", ".join(k["matrix_instructions"]) or "-")
        console.print(kt)
    if s.get("moe"):
        render_moe(console, s["moe"])
    console.print(f"decision log: {len(s['decisions'])} entries" + ("" if show_decisions else " (--decisions to list)"))
    if show_decisions:
        for d in s["decisions"]:
            line = f"  [{d['pass']}] {d['node']}: {d['action']}" + (f" — {d['reason']}" if d["reason"] else "")
            console.print(escape(line), soft_wrap=True)


def _render_state(console: Console, st: dict, weight_bytes: int) -> None:
    """One row per kind/dtype/shape with the layers that have it; then the budget line."""
    groups: dict[tuple, list[int]] = {}
    for e in st["entries"]:
        groups.setdefault((e["kind"], e["dtype"], tuple(e["shape"]), e["per"], e["bytes"]), []).append(e["layer"])
    table = Table(title=f"state: {len(st['entries'])} tensors")
    for col in ("kind", "dtype", "shape", "bytes per", "tensors", "layers"):
        table.add_column(col)
    for (kind, dtype, shape, per, nbytes), layers in groups.items():
        table.add_row(kind, dtype, f"[{', '.join(map(str, shape))}]", f"{nbytes} / {per}", str(len(layers)),
                      _ranges(layers))
    console.print(table)
    gib = st["memory_bytes"] / 2**30
    line = f"state: {st['bytes_per_token']} bytes per token, {st['bytes_per_sequence']} per sequence; in {gib:g} GiB"
    line += f" with {weight_bytes / 2**30:.2f} GiB of weights"
    if st["sequence_slots"]:
        line += f" and {st['sequence_slots']} sequence slots"
    if st["max_concurrent_tokens"] is not None:
        line += f": {st['max_concurrent_tokens']} tokens at once (--memory to size for another device)"
    console.print(line)


def _ranges(values: list[int]) -> str:
    """"0-3, 5" for [0, 1, 2, 3, 5]; a layer listed twice (its K and its V) appears once."""
    values = sorted(set(values))
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)

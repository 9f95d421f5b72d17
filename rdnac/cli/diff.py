"""`rdnac inspect --diff A B`: what changed between two plans.

Compares the headers (target, versions, compile options, model identity),
op counts, nodes (added, removed, changed op/inputs/outputs/attrs), the
kernel and config per node and step key, weights (dtype, shape, scheme) and
the decision log (entries only in one plan, as multisets). `diff_plans`
returns a JSON-able dict; `render_diff` prints it with rich.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rdnac.cli.layers import count_note, group_rows, ranges, wrap
from rdnac.ir.graph import Graph
from rdnac.plans import read_plan

_HEADER_KEYS = ("target", "rdnac_version", "triton_version", "torch_version")
_MODEL_KEYS = ("name", "format", "architecture", "config_sha256")


def _pair_if_differs(a, b) -> list | None:
    return None if a == b else [a, b]


def _header_diff(ha: dict, hb: dict) -> dict:
    out = {}
    fields = [(k, ha.get(k), hb.get(k)) for k in _HEADER_KEYS]
    fields += [(f"model.{k}", ha["model"].get(k), hb["model"].get(k)) for k in _MODEL_KEYS]
    options = sorted(set(ha.get("compile_options", {})) | set(hb.get("compile_options", {})))
    fields += [(f"compile_options.{k}", ha["compile_options"].get(k), hb["compile_options"].get(k)) for k in options]
    fields += [("weights.sha256", ha["weights"]["sha256"], hb["weights"]["sha256"]),
               ("weights.size", ha["weights"]["size"], hb["weights"]["size"])]
    for key, a, b in fields:
        if (pair := _pair_if_differs(a, b)) is not None:
            out[key] = pair
    return out


def _node_diff(ga: Graph, gb: Graph) -> dict:
    na, nb = {n.name: n for n in ga.nodes}, {n.name: n for n in gb.nodes}
    changed = []
    for name in (n for n in na if n in nb):
        a, b = na[name], nb[name]
        entry = {}
        for field in ("op", "inputs", "outputs"):
            if (pair := _pair_if_differs(getattr(a, field), getattr(b, field))) is not None:
                entry[field] = pair
        attrs = {k: [a.attrs.get(k), b.attrs.get(k)] for k in sorted(set(a.attrs) | set(b.attrs))
                 if a.attrs.get(k) != b.attrs.get(k)}
        if attrs:
            entry["attrs"] = attrs
        if entry:
            changed.append({"node": name, **entry})
    return {"removed": [{"node": n, "op": na[n].op} for n in na if n not in nb],
            "added": [{"node": n, "op": nb[n].op} for n in nb if n not in na],
            "changed": changed}


def _kernel_diff(pa: dict, pb: dict) -> list[dict]:
    out = []
    if not pa or not pb:
        return out  # a cpu plan has no program: nothing to compare per node
    for node in (n for n in pa if n in pb):
        for key in sorted(set(pa[node]) | set(pb[node]), key=lambda k: (k.split(":")[0], int(k.split(":")[1]))):
            a, b = pa[node].get(key), pb[node].get(key)
            pick = (lambda c: None if c is None else {"kernel": c["kernel"], "config": c["config"]})
            if pick(a) != pick(b):
                out.append({"node": node, "step": key, "a": pick(a), "b": pick(b)})
    return out


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _weight_diff(ga: Graph, gb: Graph) -> dict:
    changed = []
    for name in (w for w in ga.weights if w in gb.weights):
        a, b = ga.weights[name], gb.weights[name]
        entry = {f: [_plain(getattr(a, f)), _plain(getattr(b, f))] for f in ("dtype", "shape", "scheme")
                 if getattr(a, f) != getattr(b, f)}
        if entry:
            changed.append({"weight": name, **entry})
    return {"removed": [w for w in ga.weights if w not in gb.weights],
            "added": [w for w in gb.weights if w not in ga.weights], "changed": changed}


def _decision_diff(da: list[dict], db: list[dict]) -> dict:
    key = lambda d: (d["pass"], d["node"], d["action"], d["reason"])  # noqa: E731
    ca, cb = Counter(map(key, da)), Counter(map(key, db))
    as_dicts = lambda c: [dict(zip(("pass", "node", "action", "reason"), k)) for k in c.elements()]  # noqa: E731
    return {"only_a": as_dicts(ca - cb), "only_b": as_dicts(cb - ca)}


def diff_plans(path_a: str | Path, path_b: str | Path) -> dict:
    a, b = read_plan(path_a), read_plan(path_b)
    ga, gb = Graph.from_dict(a.body["graph"]), Graph.from_dict(b.body["graph"])
    ops_a, ops_b = ga.op_counts(), gb.op_counts()
    ops = {op: [ops_a.get(op, 0), ops_b.get(op, 0)] for op in sorted(set(ops_a) | set(ops_b))
           if ops_a.get(op, 0) != ops_b.get(op, 0)}
    runtime = {k: [a.body["runtime"].get(k), b.body["runtime"].get(k)]
               for k in sorted(set(a.body["runtime"]) | set(b.body["runtime"]))
               if a.body["runtime"].get(k) != b.body["runtime"].get(k)}
    out = {"a": str(a.path), "b": str(b.path), "header": _header_diff(a.header, b.header), "runtime": runtime,
           "ops": ops, "num_nodes": [len(ga.nodes), len(gb.nodes)], "nodes": _node_diff(ga, gb),
           "has_program": [bool(a.body.get("program")), bool(b.body.get("program"))],
           "kernels": _kernel_diff(a.body.get("program") or {}, b.body.get("program") or {}),
           "weights": _weight_diff(ga, gb), "decisions": _decision_diff(a.body["decisions"], b.body["decisions"])}
    n, w, dec = out["nodes"], out["weights"], out["decisions"]
    differences = (out["header"], runtime, ops, out["has_program"][0] != out["has_program"][1], n["removed"],
                   n["added"], n["changed"], out["kernels"], w["removed"], w["added"], w["changed"], dec["only_a"],
                   dec["only_b"])
    out["identical"] = not any(differences)
    return out


def _choice_text(c: dict | None) -> str:
    if c is None:
        return "-"
    cfg = c["config"]
    consts = " ".join(f"{k}={v}" for k, v in cfg.get("constexprs", {}).items())
    return f"{c['kernel']} {consts} w{cfg.get('num_warps')} s{cfg.get('num_stages')}"


def _text(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _table(title: str, columns: tuple[str, ...], rows: list[tuple]) -> Table:
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*(escape(str(x)) for x in row))
    return t


def _section(console: Console, title: str, rows: list[tuple[str, ...]], group: bool, fmt) -> None:
    """A titled list of rows, each wrapped to the width; rows alike but for the layer shown once."""
    if not rows:
        return
    groups = group_rows(rows, group)
    lines = wrap(f"{title}: {len(rows)}" + (f" in {len(groups)} groups (N: each layer listed)"
                                             if len(groups) < len(rows) else ""), console.width, "", "  ")
    for g in groups:
        where = f"{g.texts[0]}, N = {ranges(g.layers)}" if g.is_templated else g.texts[0]
        lines += wrap(fmt(where + count_note(g), *g.texts[1:]), console.width)
    for line in lines:
        console.print(escape(line), soft_wrap=True, highlight=False)


def render_diff(d: dict, console: Console | None = None, per_layer: bool = False) -> None:
    """The diff at the terminal's width; what every layer repeats is shown once unless `per_layer`."""
    console = console or Console()
    group = not per_layer
    console.print(f"[bold]A[/bold] {escape(d['a'])}\n[bold]B[/bold] {escape(d['b'])}")
    if d["identical"]:
        console.print("plans are identical in everything compared (header, graph, kernels, weights, decisions)")
        return
    if d["header"] or d["runtime"]:
        fields = {**d["header"], **{f"runtime.{k}": v for k, v in d["runtime"].items()}}
        rows = [(k, a, b) for k, (a, b) in fields.items()]
        console.print(_table("header", ("field", "A", "B"), rows))
    if d["ops"]:
        console.print(_table("op counts", ("op", "A", "B"), [(op, a, b) for op, (a, b) in d["ops"].items()]
                             + [("(all nodes)", *d["num_nodes"])]))
    n = d["nodes"]
    rows = [(e["node"], "removed (only in A)", e["op"]) for e in n["removed"]]
    rows += [(e["node"], "added (only in B)", e["op"]) for e in n["added"]]
    for e in n["changed"]:
        what = [f"{f}: {_text(e[f][0])} -> {_text(e[f][1])}" for f in ("op", "inputs", "outputs") if f in e]
        what += [f"{k}: {a} -> {b}" for k, (a, b) in e.get("attrs", {}).items()]
        rows.append((e["node"], "changed", "; ".join(what)))
    _section(console, "nodes", rows, group, lambda node, kind, what: f"{kind} {node}: {what}")
    for side, has in zip("AB", d["has_program"]):
        if not has and any(d["has_program"]):
            console.print(f"{side} has no kernels: the reference interpreter runs its graph "
                          "(kernel choices not compared)")
    rows = [(e["node"], e["step"], _choice_text(e["a"]), _choice_text(e["b"])) for e in d["kernels"]]
    _section(console, "kernel choices that differ", rows, group,
             lambda node, step, a, b: f"{node} at {step}: A {a} | B {b}")
    w = d["weights"]
    rows = [(name, "removed", "") for name in w["removed"]] + [(name, "added", "") for name in w["added"]]
    rows += [(e["weight"], "changed", "; ".join(f"{k}: {v[0]} -> {v[1]}" for k, v in e.items() if k != "weight"))
             for e in w["changed"]]
    _section(console, "weights", rows, group, lambda name, kind, what: f"{kind} {name}" + (f": {what}" if what else ""))
    dec = d["decisions"]
    rows = [(e["node"], "A", e["pass"], e["action"]) for e in dec["only_a"]]
    rows += [(e["node"], "B", e["pass"], e["action"]) for e in dec["only_b"]]
    _section(console, "decision-log entries only in one plan", rows, group,
             lambda node, side, name, action: f"only in {side}: [{name}] {node}: {action}")

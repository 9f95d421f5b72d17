"""`rdnac inspect`: a summary of a plan, as a dict (for --json) and as rich text."""

from __future__ import annotations

import re

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rdnac.cli.inspect_moe import moe_summary, nbytes, render_moe
from rdnac.cli.layers import braced, count_note, group_rows, ranges, wrap
from rdnac.errors import RdnacError
from rdnac.ir.state import bytes_per_sequence, bytes_per_token
from rdnac.plans import read_plan

DEFAULT_MEMORY = 16 << 30  # what `inspect` sizes the state for unless given --memory
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}

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


def mla_summary(graph, program: dict | None = None, kernels: list[dict] = ()) -> list[dict]:
    """Per mla_attention node: the form each phase runs (ir/mla.py), its latent cache's bytes per token and,
    for GPU plans (`program` and `kernels` as the plan body holds them), the decode T=1 kernel's tile and
    the resources of its binary (LDS, registers, spills, matrix instructions)."""
    state = {s.name: s for s in graph.state}
    out = []
    for node in graph.nodes:
        if node.op != "mla_attention":
            continue
        a = node.attrs
        entry = {"node": node.name, "prefill_form": a.get("prefill_form", "expanded"),
                 "decode_form": a.get("decode_form", "expanded"), "num_heads": a["num_heads"],
                 "kv_lora_rank": a["kv_lora_rank"], "qk_rope_head_dim": a["qk_rope_head_dim"],
                 "cache": node.inputs[1], "latent_bytes_per_token": state[node.inputs[1]].nbytes,
                 "kv_b": node.inputs[6]}
        choice = (program or {}).get(node.name, {}).get("decode:1")
        if choice is not None:
            entry["decode"] = {"kernel": choice["kernel"], "config": choice["config"],
                               "binary": _mla_decode_binary(a, choice["config"], kernels)}
        out.append(entry)
    return out


def _mla_decode_binary(attrs: dict, cfg: dict, kernels) -> dict | None:
    """The resources of the `_mla_kernel` binary built for this node's decode config, or None."""
    want = {"IS_DECODE": True, "NUM_HEADS": attrs["num_heads"], "RANK": attrs["kv_lora_rank"],
            "ROPE_DIM": attrs["qk_rope_head_dim"], **cfg["constexprs"]}
    for kb in kernels:
        call = kb["call"]
        if (kb["kernel"].endswith(":_mla_kernel") and call["num_warps"] == cfg["num_warps"]
                and call["num_stages"] == cfg["num_stages"]
                and all(call["constexprs"].get(c) == v for c, v in want.items())):
            r = kb["resources"]
            return {"shared_bytes": r["shared_bytes"], "registers": r["num_regs"], "spills": r["num_spills"],
                    "matrix_instructions": list(r["matrix_instructions"])}
    return None


def _mla_tile_cells(decode: dict | None) -> tuple[str, str]:
    if decode is None:
        return "-", "-"
    c, b = decode["config"], decode["binary"]
    tile = " ".join(f"{k}={v}" for k, v in c["constexprs"].items()) + f" w{c['num_warps']} s{c['num_stages']}"
    if b is None:
        return tile, "-"
    return tile, (f"{b['shared_bytes']} B, {b['registers']}" + (f" ({b['spills']} spilled)" if b["spills"] else "")
                  + ", " + (", ".join(b["matrix_instructions"]) or "-"))


def bytes_read_per_token(graph, moe: list[dict]) -> int:
    """Weight bytes one decode step at batch 1 reads: every weight, but one row of an embedding table the
    logits do not reuse, of each MoE layer only the top-k experts a token is routed to, and of an MLA
    layer whose decode is absorbed its per-head weights, not kv_b (the same values regrouped)."""
    logits_weights = {n.inputs[2] for n in graph.nodes if n.op == "logits"}
    embed = {n.inputs[1] for n in graph.nodes if n.op == "embedding"} - logits_weights
    total = sum(nbytes(w) for name, w in graph.weights.items() if name not in embed)
    total += sum(nbytes(graph.weights[name]) // graph.weights[name].shape[0] for name in embed)
    total -= sum(nbytes(graph.weights[m["kv_b"]]) for m in mla_summary(graph) if m["decode_form"] == "absorbed")
    return total - sum(m["expert_bytes"] - m["active_expert_bytes"] for m in moe)


def mesh_summary(plan, graph) -> dict | None:
    """A sharded plan's ranks and its collectives: where each sits and the bytes it moves per token."""
    mesh = plan.header.get("mesh")
    if not mesh:
        return None
    from rdnac.ir.collectives import summary

    rows = summary(graph, mesh["tp"])
    per_token = [r for r in rows if r["per"] == "token"]
    by_op: dict[str, int] = {}
    for r in per_token:
        by_op[r["op"]] = by_op.get(r["op"], 0) + r["per_rank_bytes"]
    return {"tp": mesh["tp"], "ep": mesh["ep"], "ep_dispatch": graph.attrs.get("mesh", {}).get("ep_dispatch"),
            "weights_files": [r["file"] for r in mesh["ranks"]], "collectives": rows,
            "all_reduce_bytes_per_token": sum(r["payload_bytes"] for r in per_token if r["op"] == "all_reduce"),
            "per_rank_bytes_per_token": sum(r["per_rank_bytes"] for r in per_token),
            "per_rank_bytes_per_token_by_op": by_op}


def render_mesh(console: Console, mesh: dict, group: bool) -> None:
    ep = ""
    if mesh["ep"]:
        ep = f" (experts placed whole per rank: --ep, {mesh.get('ep_dispatch') or 'all-reduce'} dispatch)"
    by_op = ", ".join(f"{op} {b}" for op, b in mesh["per_rank_bytes_per_token_by_op"].items())
    console.print(f"tensor parallel: {mesh['tp']} ranks{ep}, one weights file each ({mesh['weights_files'][0]}, "
                  f"...); per token the all-reduces carry {mesh['all_reduce_bytes_per_token']} bytes; each rank "
                  f"sends {mesh['per_rank_bytes_per_token']} bytes per token ({by_op})")
    table = Table(title="collectives (bytes per token; all_gather: per logits row; W ranks)")
    for col in ("node", "op", "after", "payload", "per rank", "formula"):
        table.add_column(col)
    rows = [(r["node"], r["op"], r["after"], (f"{r['rows']} x " if r["rows"] > 1 else "")
             + f"{r['width']} x {r['dtype']} = {r['payload_bytes']}", str(r["per_rank_bytes"]), r["formula"])
            for r in mesh["collectives"]]
    if group:  # layers alike once: layers.{0-35}.o_proj.all_reduce
        seen: dict[tuple, list[int]] = {}
        for row in rows:
            m = re.search(r"layers\.(\d+)\.", row[0])
            key = (re.sub(r"layers\.\d+\.", "layers.N.", row[0]), re.sub(r"layers\.\d+\.", "layers.N.", row[2]),
                   *row[3:], row[1])
            seen.setdefault(key, []).append(int(m.group(1)) if m else -1)
        rows = [(k[0].replace("layers.N.", f"layers.{{{ranges(v)}}}.") if v[0] >= 0 else k[0], k[-1],
                 k[1].replace("layers.N.", f"layers.{{{ranges(v)}}}.") if v[0] >= 0 else k[1], *k[2:-1])
                for k, v in seen.items()]
    for row in rows:
        table.add_row(*(escape(c) for c in row))
    console.print(table)


def summarize(plan_path, memory: int = DEFAULT_MEMORY) -> dict:
    plan = read_plan(plan_path)
    graph = plan.graph()
    weight_bytes = sum(nbytes(w) for w in graph.weights.values())
    moe = moe_summary(graph, plan.body.get("program") or {}, plan.body.get("kernels", []))
    return {
        "plan": str(plan.path),
        "header": plan.header,
        "model": {**plan.header["model"], **graph.attrs},
        "graph": {"num_nodes": len(graph.nodes), "ops": graph.op_counts(), "inputs": list(graph.inputs),
                  "outputs": graph.outputs},
        "weights": {"count": len(graph.weights), "bytes": weight_bytes,
                    "bytes_per_token": bytes_read_per_token(graph, moe),
                    "file": plan.header["weights"]["file"], "file_bytes": plan.header["weights"]["size"]},
        "moe": moe,
        "mla": mla_summary(graph, plan.body.get("program") or {}, plan.body.get("kernels", [])),
        "mesh": mesh_summary(plan, graph),
        "kernels": [_kernel_summary(k) for k in plan.body.get("kernels", [])],
        "program": _program_summary(plan.body.get("program") or {}),
        "runtime": plan.body["runtime"],
        "state": state_summary(graph, plan.body["runtime"], weight_bytes, memory),
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


def render_text(s: dict, show_decisions: bool = False, per_layer: bool = False, full: bool = False) -> None:
    """The summary first, at the terminal's width (80 columns when not a terminal): what every layer
    repeats is shown once (`layers.{0-35}.qkv_proj`, see layers.py). `per_layer` lists every layer,
    `show_decisions` the decision log, `full` all of that and every kernel binary."""
    console = Console()
    group = not (per_layer or full)
    h, m = s["header"], s["model"]
    console.print(f"[bold]{escape(s['plan'])}[/bold]  rdnac {h['rdnac_version']}  target [bold]{h['target']}[/bold]")
    console.print(f"model {m['name']} ({m['architecture']}, {m['format']}): {m['num_layers']} layers, hidden "
                  f"{m['hidden_size']}, heads {m['num_heads']}/{m['num_kv_heads']} x {m['head_dim']}, vocab "
                  f"{m['vocab_size']}, dtype {m['dtype']}")
    console.print(f"weights: {s['weights']['count']} tensors, {s['weights']['bytes'] / 2**20:.1f} MiB "
                  f"({s['weights']['file']})   max model len {s['runtime']['max_model_len']}, "
                  f"KV block {s['runtime']['kv_block_size']}")
    console.print(f"weights read per token at batch 1: {s['weights']['bytes_per_token'] / 2**20:.2f} MiB"
                  + (" (active experts only)" if s["moe"] else ""))
    _render_state(console, s["state"], s["weights"]["bytes"])
    if s.get("mesh"):
        render_mesh(console, s["mesh"], group)
    if s["moe"]:
        render_moe(console, s["moe"])
    if s.get("mla"):
        lt = Table(title=f"multi-head latent attention: {len(s['mla'])} layers")
        for col in ("node", "prefill", "decode", "heads", "latent", "latent bytes/token", "decode T=1 tile",
                    "LDS, registers, matrix"):
            lt.add_column(col, overflow="fold")
        rows = [(e["node"], e["prefill_form"], e["decode_form"], str(e["num_heads"]),
                 f"{e['kv_lora_rank']}+{e['qk_rope_head_dim']}", str(e["latent_bytes_per_token"]),
                 *_mla_tile_cells(e.get("decode"))) for e in s["mla"]]
        if group and len({r[1:] for r in rows}) == 1:  # every layer alike: one row
            layers = [int(re.search(r"layers\.(\d+)\.", r[0]).group(1)) for r in rows]
            rows = [(re.sub(r"layers\.\d+\.", f"layers.{{{ranges(layers)}}}.", rows[0][0]), *rows[0][1:])]
        for row in rows:
            lt.add_row(*row)
        console.print(lt)
    table = Table(title=f"graph: {s['graph']['num_nodes']} nodes")
    table.add_column("op")
    table.add_column("count", justify="right")
    for op, n in sorted(s["graph"]["ops"].items(), key=lambda kv: -kv[1]):
        table.add_row(op, str(n))
    console.print(table)
    if s["program"]:
        _render_program(console, s["program"], group)
    if s["kernels"]:
        _render_kernels(console, s["kernels"], h, full)
    _render_decisions(console, s["decisions"], show_decisions or full, group)


def _lines(console: Console, lines: list[str]) -> None:
    for line in lines:
        console.print(escape(line), soft_wrap=True, highlight=False)  # already wrapped to the width


def _short(kernel: str) -> str:
    return kernel.removeprefix("rdnac.kernels.")


def _render_program(console: Console, program: list[dict], group: bool) -> None:
    rows = []
    for e in program:
        d, p = e.get("decode"), e.get("prefill")
        if d and p and (d["kernel"], d["config"]) == (p["kernel"], p["config"]):
            choice = f"{_short(d['kernel'])}  {_config_text(d['config'])}"
        else:
            choice = " | ".join(f"{label} {_short(c['kernel'])}  {_config_text(c['config'])}"
                                for label, c in (("decode", d), ("prefill", p)) if c)
        rows.append((e["node"], choice))
    groups = group_rows(rows, group)
    lines = wrap(f"program: {len(program)} nodes' kernel and config (decode T=1 | largest prefill step)"
                 + ("; layers alike once, --layers lists each" if group else ""), console.width, "", "  ")
    for g in groups:
        node, choice = g.texts
        lines += wrap(f"{braced(node, g)}{count_note(g)}  {choice}", console.width)
    _lines(console, lines)


def _render_kernels(console: Console, kernels: list[dict], h: dict, full: bool) -> None:
    title = f"kernels: {len(kernels)} binaries for {h['target']} (Triton {h['triton_version']})"
    if full:
        kt = Table(title=title)
        for col in ("kernel", "config", "shared", "regs", "spills", "matrix instructions"):
            kt.add_column(col, overflow="fold")
        for k in kernels:
            kt.add_row(_short(k["kernel"]), _config_text(k), str(k["shared_bytes"]),
                       str(k["registers"]), str(k["spills"]), ", ".join(k["matrix_instructions"]) or "-")
        console.print(kt)
        return
    by_kernel: dict[str, list[dict]] = {}
    for k in kernels:
        by_kernel.setdefault(_short(k["kernel"]), []).append(k)
    lines = wrap(title + "; --full lists each", console.width, "", "  ")
    for name, ks in by_kernel.items():
        spills = sum(k["spills"] for k in ks)
        instructions = sorted({i for k in ks for i in k["matrix_instructions"]})
        lines += wrap(f"{name}: {len(ks)} binar{'y' if len(ks) == 1 else 'ies'}, shared up to "
                      f"{max(k['shared_bytes'] for k in ks)} B, up to {max(k['registers'] for k in ks)} registers, "
                      f"{spills or 'no'} spills; {', '.join(instructions) or 'no matrix instructions'}", console.width)
    _lines(console, lines)


def _render_decisions(console: Console, decisions: list[dict], show: bool, group: bool) -> None:
    groups = group_rows([(d["node"], d["pass"], d["action"], d["reason"]) for d in decisions], group)
    if not show:
        by_pass: dict[str, int] = {}
        for d in decisions:
            by_pass[d["pass"]] = by_pass.get(d["pass"], 0) + 1
        counts = ", ".join(f"{name} {n}" for name, n in by_pass.items())
        _lines(console, wrap(f"decision log: {len(decisions)} entries ({counts}); --decisions lists them, layers "
                             "alike once", console.width, "", "  "))
        return
    _lines(console, wrap(f"decision log: {len(decisions)} entries" + (f" in {len(groups)} groups; in a group, N "
                                                                      "stands for each layer listed" if group else ""),
                         console.width, "", "  "))
    for g in groups:
        node, name, action, reason = g.texts
        where = f"{node}, N = {ranges(g.layers)}" if g.is_templated else node
        _lines(console, wrap(f"[{name}] {where}{count_note(g)}: {action}" + (f" — {reason}" if reason else ""),
                             console.width))


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
                      ranges(layers))
    console.print(table)
    gib = st["memory_bytes"] / 2**30
    line = f"state: {st['bytes_per_token']} bytes per token, {st['bytes_per_sequence']} per sequence; in {gib:g} GiB"
    line += f" with {weight_bytes / 2**30:.2f} GiB of weights"
    if st["sequence_slots"]:
        line += f" and {st['sequence_slots']} sequence slots"
    if st["max_concurrent_tokens"] is not None:
        line += f": {st['max_concurrent_tokens']} tokens at once (--memory to size for another device)"
    console.print(line)

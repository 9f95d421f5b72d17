"""`rdnac targets`: the target table and what the installed Triton was probed to emit for each."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from rdnac.targets import TARGETS
from rdnac.targets.probe import probe


def _dot(p) -> str:
    if not p.compiled:
        return f"no ({p.reason})" if p.reason else "no"
    return ", ".join(p.matrix_instructions) if p.matrix_instructions else "compiles, no matrix instr."


def render_targets(probe_gpus: bool = True) -> None:
    console = Console()
    table = Table(title="rdnac targets")
    for col in ("target", "GPU", "wave", "LDS/block", "FP8", "HBM GB/s", "CUs", "bf16 dot", "fp8 dot", "int8 dot"):
        table.add_column(col, overflow="fold")
    for t in TARGETS.values():
        caps = probe(t) if (t.is_gpu and probe_gpus) else None
        fp8 = "-"
        if caps is not None and t.fp8_format:
            fp8 = _dot(caps.fp8_dot(t.fp8_format))
        table.add_row(t.name, t.description, str(t.warp_size) if t.is_gpu else "-",
                      f"{t.lds_bytes // 1024} KiB" if t.is_gpu else "-", t.fp8_format or "none",
                      str(t.hbm_gbps or "-"), str(t.num_compute_units or "-"),
                      _dot(caps.bf16_dot) if caps else "-", fp8, _dot(caps.int8_dot) if caps else "-")
    console.print(table)
    console.print("capabilities are probed by trial compilation with the installed Triton "
                  "(cached under ~/.cache/rdnac/probes)")

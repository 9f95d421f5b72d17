"""`rdnac targets`: the target table and what the installed Triton was probed to emit for each.

One block per target, wrapped to the terminal's width (80 columns when not a
terminal): the name in its own column, never broken, and the facts beside it.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

from rdnac.cli.layers import wrap
from rdnac.targets import TARGETS
from rdnac.targets.probe import probe


def _dot(p) -> str:
    if not p.compiled:
        return f"no ({p.reason})" if p.reason else "no"
    return ", ".join(p.matrix_instructions) if p.matrix_instructions else "compiles, no matrix instr."


def target_lines(t, caps, width: int) -> list[str]:
    """The block of one target: its description, its facts, then what its dots compile to."""
    name_width = max(len(name) for name in TARGETS) + 2
    pad = " " * name_width
    lines = wrap(t.description, width, t.name.ljust(name_width), pad)
    if not t.is_gpu:
        return lines
    lines += wrap(f"wave {t.warp_size}, LDS {t.lds_bytes // 1024} KiB per block, FP8 {t.fp8_format or 'none'}, "
                  f"HBM {t.hbm_gbps or '-'} GB/s, {t.num_compute_units or '-'} CUs", width, pad, pad)
    if caps is not None:
        dots = [f"bf16 dot: {_dot(caps.bf16_dot)}"]
        if t.fp8_format:
            dots.append(f"fp8 dot: {_dot(caps.fp8_dot(t.fp8_format))}")
        dots.append(f"int8 dot: {_dot(caps.int8_dot)}")
        for dot in dots:
            lines += wrap(dot, width, pad, pad + "  ")
    return lines


def render_targets(probe_gpus: bool = True) -> None:
    console = Console()
    lines = wrap("rdnac targets; capabilities are probed by trial compilation with the installed Triton (cached "
                 "under ~/.cache/rdnac/probes)", console.width, "", "")
    for t in TARGETS.values():
        lines += target_lines(t, probe(t) if (t.is_gpu and probe_gpus) else None, console.width)
    for line in lines:
        console.print(escape(line), soft_wrap=True, highlight=False)

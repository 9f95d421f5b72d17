"""`rdnac inspect`, `inspect --diff` and `rdnac targets` read at 80 columns (issue 23 item 13).

What every layer repeats is shown once (rdnac/cli/layers.py), so the default output of a multi-layer
GPU plan (cross-compiled for gfx1201 on this CPU) is as long as a 2-layer one's, every line fits 80
columns, and the grouped decision log still names every decision.
"""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

import rdnac
from rdnac.cli.layers import expand, group_rows, template
from rdnac.cli.main import cli
from rdnac.plans import read_plan
from tests.support.checkpoints import make_checkpoint

WIDTH = 80
NUM_LAYERS = 6


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    d = tmp_path_factory.mktemp("readable")
    out = {}
    for layers in (2, NUM_LAYERS):
        make_checkpoint("qwen3", d / f"ckpt{layers}", num_hidden_layers=layers)
        for name, disabled in (("fused", ()), ("unfused", ("fuse_add_rms_norm",))):
            out[layers, name] = rdnac.compile(d / f"ckpt{layers}", target="gfx1201", quiet=True,
                                              output=d / f"gfx1201-{layers}-{name}.msgpack", max_num_seqs=2,
                                              max_num_batched_tokens=16, disable_passes=disabled)
    return out


def _lines(*args, width: int = WIDTH) -> list[str]:
    result = CliRunner().invoke(cli, [str(a) for a in args], env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def _fits(lines: list[str]) -> None:
    wide = [line for line in lines if len(line) > WIDTH]
    assert not wide, f"{len(wide)} lines over {WIDTH} columns, e.g. {wide[0]!r}"


def test_default_inspect_is_short_and_fits_80_columns(plans):
    many, two = _lines("inspect", plans[NUM_LAYERS, "fused"]), _lines("inspect", plans[2, "fused"])
    _fits(many)
    assert len(many) <= 80, "\n".join(many)
    assert len(many) == len(two)  # does not grow with the layer count
    text = "\n".join(many)
    assert f"layers.{{0-{NUM_LAYERS - 1}}}.qkv_proj  gemm.linear" in text
    assert "layers.3." not in text  # no layer spelled out one by one
    assert "--layers" in text and "--decisions" in text and "--full" in text


def _decision_rows(plan) -> list[tuple[str, ...]]:
    return [(d["node"], d["pass"], d["action"], d["reason"]) for d in read_plan(plan).body["decisions"]]


def test_grouped_decisions_name_every_decision(plans):
    rows = _decision_rows(plans[NUM_LAYERS, "fused"])
    groups = group_rows(rows)
    assert len(groups) < len(rows) / 3  # 6 layers' entries mostly fold into one each
    expanded = sorted(row for g in groups for row in g.rows())
    assert expanded == sorted(rows)  # every decision, exactly, nothing invented

    lines = _lines("inspect", plans[NUM_LAYERS, "fused"], "--decisions")
    _fits(lines)
    bare = "".join("".join(lines).split())  # wrapping may break anywhere: compare without whitespace
    for g in groups:  # each group's whole text is printed
        node, name, action, reason = g.texts
        for part in (f"[{name}]{node}", action, reason):
            assert "".join(part.split()) in bare, part
    per_layer = _lines("inspect", plans[NUM_LAYERS, "fused"], "--decisions", "--layers")
    _fits(per_layer)
    assert len(per_layer) > len(lines)  # --layers lists each layer's rows
    assert sum("layers.3.qkv_proj" in line for line in per_layer) >= 3


def test_template_round_trips_neighbouring_layers():
    row = ("layers.4.input_norm", "fused layers.3.mlp_residual into model.layers.4.input_layernorm.weight; "
           "see layers.5.attn and layers.40.attn")
    t = template(row, 4)
    assert t == ("layers.N.input_norm", "fused layers.N-1.mlp_residual into model.layers.N.input_layernorm.weight; "
                 "see layers.N+1.attn and layers.40.attn")
    assert expand(t, 4) == row


def test_full_lists_every_kernel_binary(plans):
    plan = plans[NUM_LAYERS, "fused"]
    lines = _lines("inspect", plan, "--full", width=250)  # one table row per binary at this width
    text = "\n".join(lines)
    assert len(read_plan(plan).body["kernels"]) == sum(1 for line in lines if re.match(r"│ \w+:_\w+ +│", line))
    assert "decision log" in text and "layers.5.down_proj" in text


def test_diff_groups_layers_and_fits_80_columns(plans):
    many = _lines("inspect", "--diff", plans[NUM_LAYERS, "unfused"], plans[NUM_LAYERS, "fused"])
    two = _lines("inspect", "--diff", plans[2, "unfused"], plans[2, "fused"])
    _fits(many)
    assert len(many) <= 60 and len(many) <= len(two) + 6, "\n".join(many)
    text = "\n".join(many)
    assert f"removed (only in A) layers.N.attn_residual, N = 0-{NUM_LAYERS - 1}: add" in text
    assert f"changed layers.N.input_norm, N = 1-{NUM_LAYERS - 1}: inputs: layers.N-1.mlp_residual" in " ".join(
        " ".join(many).split())
    every = _lines("inspect", "--diff", plans[NUM_LAYERS, "unfused"], plans[NUM_LAYERS, "fused"], "--layers")
    assert sum("removed (only in A) layers." in line for line in every) == 2 * NUM_LAYERS


def test_targets_fit_80_columns_and_never_break_a_name():
    lines = _lines("targets")
    _fits(lines)
    names = [line.split()[0] for line in lines if line and not line[0].isspace()]
    for name in ("gfx1201", "gfx1151", "gfx942", "gfx950", "sm90", "sm89", "sm80", "cpu"):
        assert name in names, name
    assert any("v_wmma_f32_16x16x16_bf16" in line for line in lines)

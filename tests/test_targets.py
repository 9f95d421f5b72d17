"""Targets as data and capabilities probed by cross-compiling with the installed Triton (CPU only)."""

from __future__ import annotations

import dataclasses
import time

import pytest

from rdnac.errors import TargetError
from rdnac.targets import TARGETS, Target, get_target, gpu_target_names
from rdnac.targets.probe import Capabilities, probe

KIB = 1024
PROBED = ["gfx1201", "gfx942", "gfx950", "sm90"]


def test_every_target_is_listed_with_the_design_table_values():
    for name in ("gfx1201", "gfx1151", "gfx942", "gfx950", "sm90", "cpu"):
        assert name in TARGETS
    assert (get_target("gfx1201").warp_size, get_target("gfx1201").lds_bytes) == (32, 64 * KIB)
    assert get_target("gfx1151").fp8_format is None
    assert get_target("gfx942").fp8_format == "e4m3fnuz" and get_target("gfx942").warp_size == 64
    assert get_target("gfx950").lds_bytes == 160 * KIB and get_target("gfx950").has_mxfp4
    assert get_target("sm90").lds_bytes == 227 * KIB and get_target("sm90").arch == 90
    assert not get_target("cpu").is_gpu and "cpu" not in gpu_target_names()
    for target in TARGETS.values():
        assert isinstance(target.passes, tuple) and target.passes


def test_unknown_target_error_lists_the_known_ones():
    with pytest.raises(TargetError) as info:
        get_target("gfx9999")
    message = str(info.value)
    assert "gfx9999" in message
    for name in TARGETS:
        assert name in message


def test_targets_are_frozen_and_validated():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_target("gfx1201").lds_bytes = 1  # type: ignore[misc]
    with pytest.raises(TargetError, match="fp8_format"):
        Target("x", "hip", "gfx1201", 32, 65536, "e5m2", False, 1, 1, "bad")
    with pytest.raises(TargetError, match="backend"):
        Target("x", "metal", "m1", 32, 65536, None, False, 1, 1, "bad")
    with pytest.raises(TargetError, match="GPU target"):
        get_target("cpu").gpu_target()


def test_gpu_target_is_tritons():
    from triton.backends.compiler import GPUTarget

    assert get_target("gfx1201").gpu_target() == GPUTarget("hip", "gfx1201", 32)
    assert get_target("sm90").gpu_target() == GPUTarget("cuda", 90, 32)


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> tuple[dict[str, Capabilities], object]:
    cache = tmp_path_factory.mktemp("rdnac-cache")
    return {name: probe(name, cache_dir=cache) for name in PROBED}, cache


@pytest.mark.parametrize("name", PROBED)
def test_probe_finds_a_bf16_matrix_instruction(probed, name):
    caps = probed[0][name]
    assert caps.bf16_dot.compiled and caps.bf16_dot.is_native, caps.bf16_dot
    prefix = {"gfx1201": "v_wmma_", "gfx942": "v_mfma_", "gfx950": "v_mfma_", "sm90": "wgmma."}[name]
    assert any(i.startswith(prefix) for i in caps.bf16_dot.matrix_instructions), caps.bf16_dot
    assert caps.int8_dot.is_native, caps.int8_dot
    # Read from the GPU when the probe runs on one of this target (the device machine's sm90), else the table.
    assert caps.lds_bytes == get_target(name).lds_bytes and caps.lds_source in ("target table", "device")


def test_probe_fp8_formats(probed):
    caps = probed[0]
    assert caps["gfx942"].fp8_format == "e4m3fnuz"
    assert not caps["gfx942"].fp8_dot("e4m3fn").is_native  # compiles, but by upcasting to f16
    for name in ("gfx1201", "gfx950", "sm90"):
        assert caps[name].fp8_format == "e4m3fn", caps[name].fp8_dots
        assert caps[name].fp8_format == get_target(name).fp8_format


def test_failed_probe_records_the_reason(probed):
    fnuz = probed[0]["sm90"].fp8_dot("e4m3fnuz")
    assert not fnuz.compiled and not fnuz.is_native
    assert "fp8e4b8" in fnuz.reason and "\n" not in fnuz.reason


def test_probe_cache_hit_and_round_trip(probed):
    caps, cache = probed
    start = time.perf_counter()
    again = probe("gfx942", cache_dir=cache)
    assert time.perf_counter() - start < 0.5
    assert again == caps["gfx942"]
    assert Capabilities.from_dict(caps["sm90"].to_dict()) == caps["sm90"]
    assert (cache / "probes").glob("gfx942-triton*.json")

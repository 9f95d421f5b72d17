"""IR op `add`: out = a + b over contiguous tensors of one shape.

Config space: BLOCK (elements per program) and num_warps; problem keys
{"numel_per_token", "dtype"}. Graphs from the Llama family have no `add`
left after fuse_add_rms_norm; this runs when that pass is disabled.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.kernels.launch import Launcher, cdiv


@triton.jit
def _add_kernel(a_ptr, b_ptr, out_ptr, numel, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    a = tl.load(a_ptr + offsets, mask=mask).to(tl.float32)
    b = tl.load(b_ptr + offsets, mask=mask).to(tl.float32)
    tl.store(out_ptr + offsets, (a + b).to(out_ptr.dtype.element_ty), mask=mask)


def add(a: torch.Tensor, b: torch.Tensor, *, config: dict, launcher: Launcher) -> torch.Tensor:
    assert a.shape == b.shape and a.is_contiguous() and b.is_contiguous(), "add: operands must match and be contiguous"
    out = torch.empty_like(a)
    block = config["constexprs"]["BLOCK"]
    launcher.launch(_add_kernel, (cdiv(a.numel(), block),), (a, b, out, a.numel()),
                    constexprs={"BLOCK": block}, num_warps=config["num_warps"], num_stages=1)
    return out


def config_space(problem: dict) -> list[dict]:
    return [{"constexprs": {"BLOCK": block}, "num_warps": warps, "num_stages": 1}
            for block, warps in ((1024, 4), (2048, 8))]


def default_config(problem: dict) -> dict:
    return config_space(problem)[0]


# Below the kernels: an import above them would move their line numbers, which Triton's source hash
# and the binaries' line info include.
from rdnac.kernels.registry import KernelFamily, OpKernel, dtype_name  # noqa: E402


FAMILY = KernelFamily(
    "elementwise", config_space=config_space, default_config=default_config,
    ops={"add": OpKernel(add, lambda a, ins, phase, runtime: {"numel_per_token": ins[0].shape[1],
                                                               "dtype": dtype_name(ins[0])})})

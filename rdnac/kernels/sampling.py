"""Token selection on the device: the IR op `argmax`.

argmax(logits [R, V]) -> [R] int64 matches torch.argmax exactly: the lowest
index among equal maxima, and a NaN counts as the maximum (the first NaN
wins). Every program keeps, per lane, the first maximum it saw; lanes are
then reduced by (value, lowest index), so the result does not depend on the
reduction order or the config (deterministic). NUM_SPLITS = 1 is a
single pass, one program per row looping over V in BLOCK_V tiles; NUM_SPLITS
> 1 (a power of two) splits each row over that many programs and merges the
partial (value, index) pairs in a second launch: more parallelism for the
few rows of a decode step.

Sampling is not here: rdnac.runtime.sampling draws tokens with a counter-based rule (one
Philox uniform per token, keyed by the request seed and counted by its step, the same bits as
tl.rand) that also covers top-p, min-p, repetition penalty and logprobs, inside the captured decode
graphs; the Gumbel-max top-k kernel this file held (never wired into plans) was removed for it
(issue 22; git history at 1345601).

Problem keys: {"R": rows, "V": vocab}.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.kernels.launch import Launcher, next_power_of_2

# model-shape ints (never token counts) that AOT binaries specialize on divisibility by 16, as the JIT does,
# so row loads vectorize; see rdnac.kernels.launch.divisible_args
AOT_DIVISIBLE = {"_argmax_partial_kernel": ("V", "stride_row")}

# tl.sum/tl.max/tl.min/tl.zeros/tl.cdiv are @triton.jit functions, which the interpreter path
# cannot call; tl.reduce with the standard combine functions is what they lower to.
_MAX = tl.standard._elementwise_max
_MIN = tl.standard._elementwise_min
_INT32_MAX = tl.constexpr(2147483647)


@triton.jit
def _argmax_partial_kernel(logits_ptr, value_ptr, index_ptr, V, stride_row,
                           BLOCK_V: tl.constexpr, NUM_SPLITS: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    split_len = ((V + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_V - 1) // BLOCK_V * BLOCK_V
    lo = split * split_len
    hi = tl.minimum(lo + split_len, V)
    lanes = tl.arange(0, BLOCK_V)
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_index = tl.full([BLOCK_V], _INT32_MAX, tl.int32)  # _INT32_MAX: lane saw nothing yet
    for start in range(lo, hi, BLOCK_V):
        cols = start + lanes
        mask = cols < hi
        x = tl.load(logits_ptr + row * stride_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        # strictly greater keeps the lane's first maximum; a NaN beats any number
        take = mask & ((best_index == _INT32_MAX) | (x > best) | ((x != x) & (best == best)))
        best = tl.where(take, x, best)
        best_index = tl.where(take, cols, best_index)
    is_nan = best != best
    nan_index = tl.reduce(tl.where(is_nan, best_index, _INT32_MAX), 0, _MIN)
    top = tl.reduce(tl.where(is_nan, float("-inf"), best), 0, _MAX)
    top_index = tl.reduce(tl.where((best == top) & (best_index != _INT32_MAX), best_index, _INT32_MAX), 0, _MIN)
    has_nan = nan_index != _INT32_MAX
    if NUM_SPLITS == 1:
        tl.store(index_ptr + row, tl.where(has_nan, nan_index, top_index).to(tl.int64))
    else:
        tl.store(value_ptr + row * NUM_SPLITS + split, tl.where(has_nan, float("nan"), top))
        tl.store(index_ptr + row * NUM_SPLITS + split, tl.where(has_nan, nan_index, top_index))


@triton.jit
def _argmax_merge_kernel(value_ptr, index_ptr, out_ptr, NUM_SPLITS: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, NUM_SPLITS)
    best = tl.load(value_ptr + row * NUM_SPLITS + splits)  # [NUM_SPLITS]
    best_index = tl.load(index_ptr + row * NUM_SPLITS + splits)  # _INT32_MAX: empty split
    is_nan = best != best
    nan_index = tl.reduce(tl.where(is_nan, best_index, _INT32_MAX), 0, _MIN)
    top = tl.reduce(tl.where(is_nan, float("-inf"), best), 0, _MAX)
    top_index = tl.reduce(tl.where((best == top) & (best_index != _INT32_MAX), best_index, _INT32_MAX), 0, _MIN)
    tl.store(out_ptr + row, tl.where(nan_index != _INT32_MAX, nan_index, top_index).to(tl.int64))


def argmax(logits: torch.Tensor, *, config: dict, launcher: Launcher) -> torch.Tensor:
    """logits [R, V] float -> [R] int64, torch.argmax(dim=-1) semantics."""
    assert logits.stride(-1) == 1, "argmax needs unit stride along V"
    num_rows, vocab = logits.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)  # [R]
    if num_rows == 0:
        return out
    c = config["constexprs"]
    splits = c["NUM_SPLITS"]
    assert splits >= 1 and splits & (splits - 1) == 0, f"NUM_SPLITS must be a power of two; got {splits}"
    if splits == 1:
        launcher.launch(_argmax_partial_kernel, (num_rows, 1), (logits, out, out, vocab, logits.stride(0)),
                        constexprs={"BLOCK_V": c["BLOCK_V"], "NUM_SPLITS": 1},
                        num_warps=config["num_warps"], num_stages=config["num_stages"])
        return out
    values = torch.empty(num_rows, splits, dtype=torch.float32, device=logits.device)  # [R, S]
    indices = torch.empty(num_rows, splits, dtype=torch.int32, device=logits.device)  # [R, S]
    launcher.launch(_argmax_partial_kernel, (num_rows, splits), (logits, values, indices, vocab, logits.stride(0)),
                    constexprs={"BLOCK_V": c["BLOCK_V"], "NUM_SPLITS": splits},
                    num_warps=config["num_warps"], num_stages=config["num_stages"])
    launcher.launch(_argmax_merge_kernel, (num_rows,), (values, indices, out),
                    constexprs={"NUM_SPLITS": splits}, num_warps=1, num_stages=1)
    return out


def config_space(problem: dict) -> list[dict]:
    """argmax candidates for {"V", "R"}: single pass (NUM_SPLITS 1) and split rows."""
    vocab = problem["V"]
    configs = []
    for splits in (1, 4, 16, 64):
        for block in (1024, 2048, 4096):
            if splits > 1 and splits * block > 2 * next_power_of_2(vocab):
                continue  # most splits would be empty
            configs += [{"constexprs": {"BLOCK_V": block, "NUM_SPLITS": splits}, "num_warps": w, "num_stages": 1}
                        for w in (4, 8)]
    return configs


def default_config(problem: dict) -> dict:
    # few rows (decode): split each row so ~64 programs share the read; many rows: one program each
    rows, vocab = problem.get("R", 1), problem["V"]
    splits = 1
    while splits < 64 and rows * splits < 128 and (splits * 4) * 2048 <= 2 * next_power_of_2(vocab):
        splits *= 4
    return {"constexprs": {"BLOCK_V": 2048, "NUM_SPLITS": splits}, "num_warps": 4, "num_stages": 1}

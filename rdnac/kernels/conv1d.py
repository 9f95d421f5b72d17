"""Causal depthwise conv1d with its rolling per-sequence state: implements IR op `causal_conv1d`
(rdnac.ir.linear_attention), the q/k/v convolution of Gated DeltaNet layers.

One kernel serves both phases. Program (b, channel tile, token tile) computes
out[t, c] = act(sum_j weight[c, j] * window[t + j, c]) for BLOCK_T tokens of
sequence b's chunk (tokens cu_seqlens_q[b] .. cu_seqlens_q[b+1]), where the
window is [the slot's K-1 previous inputs, this chunk's inputs]: positions
before the chunk come from conv_state[state_slots[b]] (zeros when the chunk
starts its sequence or the slot is -1), the rest from x. The activation and
the state write are fused: the program of token tile 0, the only one that
reads the slot (BLOCK_T >= K-1), also writes it (the chunk's last K-1
window columns), after a barrier so every thread of the program has read the
old state first; no other program touches the slot, so there is no race
between tiles. Prefill grids cover cdiv(max_query_len, BLOCK_T) token tiles
(a host int); decode steps (T == B) launch one tile of BLOCK_T = 1, so the
grid depends only on B and a captured graph replays for any slots.

Rounding mirrors the reference: inputs in the weight's dtype, the sum in
float32 rounded to the weight's dtype (F.conv1d's output), SiLU in float32
rounded to x's dtype; the state in its own dtype.

Config space: BLOCK_C (channels per program), BLOCK_T (tokens per program,
1 at decode), num_warps. Problem keys: {"phase", "channels", "kernel_size",
"dtype", "num_seqs", "num_tokens"}.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.kernels.launch import Launcher, cdiv, next_power_of_2

AOT_DIVISIBLE = {"_causal_conv1d_kernel": ("num_channels", "stride_x", "stride_out")}


@triton.jit
def _causal_conv1d_kernel(x_ptr, weight_ptr, state_ptr, slots_ptr, seq_lens_ptr, cu_seqlens_ptr, out_ptr,
                          num_channels, stride_x, stride_out,
                          KERNEL_SIZE: tl.constexpr, BLOCK_KM1: tl.constexpr, IS_SILU: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    w_dtype = weight_ptr.dtype.element_ty
    seq = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] channels
    tile = tl.program_id(2)
    start = tl.load(cu_seqlens_ptr + seq)
    length = tl.load(cu_seqlens_ptr + seq + 1) - start
    slot = tl.load(slots_ptr + seq)
    # the chunk continues its sequence (not at position 0) and owns a slot: the window starts in the slot
    reads_state = (slot >= 0) & (tl.load(seq_lens_ptr + seq) != length)
    c_ok = c < num_channels
    # scalar conditions enter masks as bounds: the Triton interpreter turns `vector & scalar bool` into int32
    c_reads = c < tl.where(reads_state, num_channels, 0)
    c_writes = c < tl.where(slot >= 0, num_channels, 0)
    state_row = state_ptr + slot.to(tl.int64) * num_channels * (KERNEL_SIZE - 1) + c * (KERNEL_SIZE - 1)  # [BLOCK_C]

    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] token positions within the chunk
    acc = tl.full([BLOCK_T, BLOCK_C], 0.0, tl.float32)
    for j in tl.static_range(KERNEL_SIZE):
        p = t + j - (KERNEL_SIZE - 1)  # [BLOCK_T] the input at window column t + j, chunk-relative
        in_x = ((p >= 0) & (p < length))[:, None] & c_ok[None, :]
        xj = tl.load(x_ptr + (start + p).to(tl.int64)[:, None] * stride_x + c[None, :], mask=in_x, other=0.0)
        in_state = (p < 0)[:, None] & c_reads[None, :]
        sj = tl.load(state_row[None, :] + (p + KERNEL_SIZE - 1)[:, None], mask=in_state, other=0.0)
        w = tl.load(weight_ptr + c * KERNEL_SIZE + j, mask=c_ok, other=0.0).to(tl.float32)  # [BLOCK_C]
        acc += (xj.to(w_dtype).to(tl.float32) + sj.to(w_dtype).to(tl.float32)) * w[None, :]
    y = acc.to(w_dtype).to(tl.float32)
    if IS_SILU:
        y = y / (1.0 + tl.exp(-y))  # silu; tl.sigmoid is a jit function (see rms_norm.py)
    out_mask = (t < length)[:, None] & c_ok[None, :]
    tl.store(out_ptr + (start + t).to(tl.int64)[:, None] * stride_out + c[None, :], y.to(out_ptr.dtype.element_ty),
             mask=out_mask)

    if tile == 0:  # the one program per (sequence, channel tile) that read the slot writes it
        i = tl.arange(0, BLOCK_KM1)  # [BLOCK_KM1] the new state's columns: window columns length .. length+K-2
        i_ok = i < KERNEL_SIZE - 1
        src = length - (KERNEL_SIZE - 1) + i  # chunk-relative input position of each new column
        from_x = tl.load(x_ptr + (start + src).to(tl.int64)[None, :] * stride_x + c[:, None],
                         mask=c_ok[:, None] & (i_ok & (src >= 0))[None, :], other=0.0)  # [BLOCK_C, BLOCK_KM1]
        from_state = tl.load(state_row[:, None] + (src + KERNEL_SIZE - 1)[None, :],
                             mask=c_reads[:, None] & (i_ok & (src < 0))[None, :], other=0.0)
        new = from_x.to(w_dtype).to(tl.float32) + from_state.to(w_dtype).to(tl.float32)
        tl.debug_barrier()  # every thread of the program has read the old state (above and in the loop)
        tl.store(state_row[:, None] + i[None, :], new.to(state_ptr.dtype.element_ty),
                 mask=c_writes[:, None] & i_ok[None, :])


def _launch(x, weight, conv_state, state_slots, seq_lens, cu_seqlens_q, kernel_size, activation, num_tiles,
            config, launcher):
    num_tokens, channels = x.shape  # [T, C]
    assert x.stride(-1) == 1 and weight.is_contiguous() and conv_state.is_contiguous()
    assert tuple(conv_state.shape[1:]) == (channels, kernel_size - 1) and weight.shape == (channels, kernel_size)
    c = config["constexprs"]
    assert num_tiles == 1 or c["BLOCK_T"] >= kernel_size - 1, "only token tile 0 may read the slot"
    out = torch.empty_like(x, memory_format=torch.contiguous_format)  # [T, C]
    num_seqs = state_slots.shape[0]
    if num_tokens > 0 and num_seqs > 0:
        launcher.launch(_causal_conv1d_kernel, (num_seqs, cdiv(channels, c["BLOCK_C"]), num_tiles),
                        (x, weight, conv_state, state_slots, seq_lens, cu_seqlens_q, out, channels, x.stride(0),
                         out.stride(0)),
                        constexprs={"KERNEL_SIZE": kernel_size, "BLOCK_KM1": next_power_of_2(kernel_size - 1),
                                    "IS_SILU": activation == "silu", "BLOCK_T": c["BLOCK_T"],
                                    "BLOCK_C": c["BLOCK_C"]},
                        num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out


def causal_conv1d_prefill(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor, state_slots: torch.Tensor,
                          seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, *, kernel_size: int,
                          activation: str = "silu", max_query_len: int, config: dict,
                          launcher: Launcher) -> torch.Tensor:
    """x [T, C] (a ragged batch of chunks), weight [C, K], conv_state [NS, C, K-1] (written in place),
    state_slots [B], seq_lens [B], cu_seqlens_q [B+1] -> [T, C]. `max_query_len` (host int) bounds
    the longest chunk."""
    num_tiles = cdiv(max(max_query_len, 1), config["constexprs"]["BLOCK_T"])
    return _launch(x, weight, conv_state, state_slots, seq_lens, cu_seqlens_q, kernel_size, activation, num_tiles,
                   config, launcher)


def causal_conv1d_decode(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor, state_slots: torch.Tensor,
                         seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, *, kernel_size: int,
                         activation: str = "silu", config: dict, launcher: Launcher) -> torch.Tensor:
    """One token per sequence (T == B): one token tile, a grid from B only (graph-capturable)."""
    return _launch(x, weight, conv_state, state_slots, seq_lens, cu_seqlens_q, kernel_size, activation, 1,
                   config, launcher)


def config_space(problem: dict) -> list[dict]:
    whole = next_power_of_2(problem["channels"])
    if problem["phase"] == "decode":
        shapes = [(1, bc) for bc in (128, 256, 512, 1024) if bc <= max(whole, 128)]
    else:
        shapes = [(bt, bc) for bt in (32, 16, 64) for bc in (64, 128, 32) if bc <= max(whole, 32)]
    return [{"constexprs": {"BLOCK_T": bt, "BLOCK_C": bc}, "num_warps": w, "num_stages": 1}
            for bt, bc in shapes for w in (4, 2, 8) if w * 32 <= bt * bc]


def default_config(problem: dict) -> dict:
    return config_space(problem)[0]


# Below the kernels: an import above them would move their line numbers, which Triton's source hash
# and the binaries' line info include.
from rdnac.kernels.registry import KernelFamily, OpKernel, dtype_name  # noqa: E402


def _problem(a: dict, ins: list, phase: str, runtime: dict) -> dict:
    return {"phase": phase, "channels": ins[0].shape[1], "kernel_size": a["kernel_size"],
            "dtype": dtype_name(ins[0]), "num_seqs": ins[3].shape[0], "num_tokens": ins[0].shape[0]}


FAMILY = KernelFamily(
    "causal_conv1d", config_space=config_space, default_config=default_config,
    size=lambda p: p["num_seqs"] if p["phase"] == "decode" else p["num_tokens"],
    ops={"causal_conv1d": OpKernel(causal_conv1d_prefill, _problem, decode=causal_conv1d_decode,
                                   takes_max_query_len=True)})

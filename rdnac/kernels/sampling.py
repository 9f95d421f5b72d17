"""Token selection on the device: the IR op `argmax`, and `sample` (temperature + top-k).

argmax(logits [R, V]) -> [R] int64 matches torch.argmax exactly: the lowest
index among equal maxima, and a NaN counts as the maximum (the first NaN
wins). Every program keeps, per lane, the first maximum it saw; lanes are
then reduced by (value, lowest index), so the result does not depend on the
reduction order or the config (deterministic). NUM_SPLITS = 1 is a
single pass, one program per row looping over V in BLOCK_V tiles; NUM_SPLITS
> 1 (a power of two) splits each row over that many programs and merges the
partial (value, index) pairs in a second launch: more parallelism for the
few rows of a decode step.

sample(logits, temperature, top_k, seeds, offsets) -> [R] int64. Row r:
  * temperature[r] <= 0: greedy, exactly argmax above.
  * otherwise the candidate set S is the top_k[r] tokens in the order
    (logit descending, index ascending), i.e. ties at the k-th logit are
    broken toward the lower index and |S| = k exactly; top_k[r] <= 0 or
    >= V means S is the whole vocabulary. The token is drawn from
    P(i) = softmax(logits[S] / temperature[r]).
  * the draw is Gumbel-max: token = argmax_{i in S} logits[i] / temperature
    + g_i, g_i = -log(-log(u_i)), u_i = tl.rand(seeds[r], (offsets[r] << 32) | i):
    Philox-4x32-10 keyed by the 64-bit seed with counter (i, step, 0, 0).
    Each (seed, step, token) has its own uniform, so the result depends on
    neither the config nor the batch composition, and a fixed (seed, step)
    replays the same token. Exact up to float32 rounding and the 2**-24
    resolution of u (which truncates the Gumbel tail past ~16.6).
  * top_k[r] may be at most the config's TOPK_MAX; larger values act as
    TOPK_MAX. The runtime must reject requests over `max_top_k(config)` on
    the host, where top_k is still a request parameter.
  * NaN logits: a sampled row never draws a NaN token unless every
    candidate is NaN, and then returns its greedy token.
Implementation: launch 1, one program per (row, BLOCK_V chunk), writes the
chunk's top TOPK_MAX tokens as unique int64 keys (order-preserving float bits
above, ~index below) and the chunk's Gumbel winner over all its tokens;
launch 2, one program per row, takes the k-th largest key as the threshold,
redraws the noise of the keys above it, and picks the winner. The global
top-k lies inside the union of the chunks' top-k, so nothing is lost.

Problem keys: {"R": rows, "V": vocab, "max_top_k": largest top_k the
runtime accepts (sample only)}.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.kernels.launch import Launcher, cdiv, next_power_of_2

# model-shape ints (never token counts) that AOT binaries specialize on divisibility by 16, as the JIT does,
# so row loads vectorize; see rdnac.kernels.launch.divisible_args
AOT_DIVISIBLE = {"_argmax_partial_kernel": ("V", "stride_row"), "_sample_chunk_kernel": ("V", "stride_row")}

# tl.sum/tl.max/tl.min/tl.zeros/tl.cdiv are @triton.jit functions, which the interpreter path
# cannot call; tl.reduce with the standard combine functions is what they lower to.
_MAX = tl.standard._elementwise_max
_MIN = tl.standard._elementwise_min
_SUM = tl.standard._sum_combine
_INT32_MAX = tl.constexpr(2147483647)
_EMPTY_KEY = tl.constexpr(-9223372036854775807)  # below every real key, the smallest being 0x807FFFFF << 32


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


@triton.jit
def _sample_chunk_kernel(logits_ptr, temperature_ptr, seeds_ptr, offsets_ptr, keys_ptr, win_score_ptr,
                         win_index_ptr, V, stride_row, num_chunks,
                         BLOCK_V: tl.constexpr, TOPK_MAX: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK_V + tl.arange(0, BLOCK_V)  # [BLOCK_V]
    mask = cols < V
    x = tl.load(logits_ptr + row * stride_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
    # unique key ordered by (logit desc, index asc): float bits made monotone as int32
    # (NaN made the largest and -0 equal to +0, as torch.argmax sees them), ~index below
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(x != x, 0x7FC00000, tl.where(x == 0.0, 0, bits))
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = (ordered.to(tl.int64) << 32) | (0xFFFFFFFF - cols.to(tl.int64))
    key = tl.where(mask, key, _EMPTY_KEY)
    slot = (row * num_chunks + chunk) * TOPK_MAX
    tl.store(keys_ptr + slot + tl.arange(0, TOPK_MAX), tl.topk(key, TOPK_MAX))

    # Gumbel-max winner of the whole chunk, for rows without top-k
    temperature = tl.load(temperature_ptr + row)
    temperature = tl.where(temperature > 0, temperature, 1.0)
    u = tl.rand(tl.load(seeds_ptr + row), (tl.load(offsets_ptr + row) << 32) | cols.to(tl.int64))
    # div_rn: Triton's `/` is approximate on NVIDIA; IEEE division gives the same score everywhere
    score = tl.where(mask, tl.math.div_rn(x, temperature) - tl.log(-tl.log(u)), float("-inf"))
    best = tl.reduce(score, 0, _MAX)
    winner = tl.reduce(tl.where(mask & (score == best), cols, _INT32_MAX), 0, _MIN)
    tl.store(win_score_ptr + row * num_chunks + chunk, best)
    tl.store(win_index_ptr + row * num_chunks + chunk, winner)


@triton.jit
def _sample_select_kernel(keys_ptr, win_score_ptr, win_index_ptr, temperature_ptr, top_k_ptr, seeds_ptr,
                          offsets_ptr, out_ptr, V, num_chunks,
                          TOPK_MAX: tl.constexpr, BLOCK_CHUNKS: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, BLOCK_CHUNKS * TOPK_MAX)
    keys = tl.load(keys_ptr + row * num_chunks * TOPK_MAX + slots, mask=slots < num_chunks * TOPK_MAX,
                   other=_EMPTY_KEY)  # [BLOCK_CHUNKS * TOPK_MAX]
    greedy = 0xFFFFFFFF - (tl.reduce(keys, 0, _MAX) & 0xFFFFFFFF)

    # top-k: the k-th largest key is the threshold; the keys at or above it are S
    top_k = tl.load(top_k_ptr + row)
    use_top_k = (top_k > 0) & (top_k < V)
    k = tl.minimum(tl.maximum(top_k, 1), TOPK_MAX)
    ranked = tl.topk(keys, TOPK_MAX)  # [TOPK_MAX], descending
    threshold = tl.reduce(tl.where(tl.arange(0, TOPK_MAX) == k - 1, ranked, 0), 0, _SUM)
    in_set = keys >= threshold
    index = 0xFFFFFFFF - (keys & 0xFFFFFFFF)
    ordered = (keys >> 32).to(tl.int32)
    x = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(tl.float32, bitcast=True)
    temperature = tl.load(temperature_ptr + row)
    safe_temperature = tl.where(temperature > 0, temperature, 1.0)
    # the same uniforms the chunk kernel drew for these tokens
    u = tl.rand(tl.load(seeds_ptr + row), (tl.load(offsets_ptr + row) << 32) | index)
    score = tl.where(in_set, tl.math.div_rn(x, safe_temperature) - tl.log(-tl.log(u)), float("-inf"))
    best = tl.reduce(score, 0, _MAX)
    top_k_pick = tl.reduce(tl.where(in_set & (score == best), index, _INT32_MAX), 0, _MIN)

    # no top-k: the best of the chunk winners
    chunks = tl.arange(0, BLOCK_CHUNKS)
    chunk_mask = chunks < num_chunks
    win_score = tl.load(win_score_ptr + row * num_chunks + chunks, mask=chunk_mask, other=float("-inf"))
    win_index = tl.load(win_index_ptr + row * num_chunks + chunks, mask=chunk_mask, other=_INT32_MAX)
    win_best = tl.reduce(win_score, 0, _MAX)
    full_pick = tl.reduce(tl.where(chunk_mask & (win_score == win_best), win_index, _INT32_MAX), 0, _MIN)

    sampled = tl.where(use_top_k, top_k_pick, full_pick.to(tl.int64))
    # NaN scores can leave no winner; never return an out-of-range token
    sampled = tl.where(sampled < V, sampled, greedy)
    tl.store(out_ptr + row, tl.where(temperature > 0, sampled, greedy))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, seeds: torch.Tensor,
           offsets: torch.Tensor, *, config: dict, launcher: Launcher) -> torch.Tensor:
    """logits [R, V] float32, temperature [R] float32, top_k [R] int32, seeds [R] int64,
    offsets [R] int64 (the decode step) -> tokens [R] int64. Semantics in the module docstring."""
    assert logits.stride(-1) == 1, "sample needs unit stride along V"
    num_rows, vocab = logits.shape
    c = config["constexprs"]
    block_v, topk_max = c["BLOCK_V"], c["TOPK_MAX"]
    assert topk_max & (topk_max - 1) == 0 and topk_max <= block_v, \
        f"TOPK_MAX must be a power of two <= BLOCK_V; got {topk_max}, {block_v}"
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)  # [R]
    if num_rows == 0:
        return out
    num_chunks = cdiv(vocab, block_v)
    keys = torch.empty(num_rows, num_chunks, topk_max, dtype=torch.int64, device=logits.device)  # [R, C, K]
    win_score = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=logits.device)  # [R, C]
    win_index = torch.empty(num_rows, num_chunks, dtype=torch.int32, device=logits.device)  # [R, C]
    launcher.launch(_sample_chunk_kernel, (num_rows, num_chunks),
                    (logits, temperature, seeds, offsets, keys, win_score, win_index,
                     vocab, logits.stride(0), num_chunks),
                    constexprs={"BLOCK_V": block_v, "TOPK_MAX": topk_max},
                    num_warps=config["num_warps"], num_stages=config["num_stages"])
    launcher.launch(_sample_select_kernel, (num_rows,),
                    (keys, win_score, win_index, temperature, top_k, seeds, offsets, out, vocab, num_chunks),
                    constexprs={"TOPK_MAX": topk_max, "BLOCK_CHUNKS": next_power_of_2(num_chunks)},
                    num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out


def max_top_k(config: dict) -> int:
    """The largest top_k a `sample` config honours; the runtime rejects larger requests."""
    return config["constexprs"]["TOPK_MAX"]


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


def sample_config_space(problem: dict) -> list[dict]:
    """sample candidates for {"V", "max_top_k"}; TOPK_MAX is the power of two covering max_top_k."""
    topk_max = next_power_of_2(max(problem.get("max_top_k", 64), 1))
    return [{"constexprs": {"BLOCK_V": block, "TOPK_MAX": topk_max}, "num_warps": w, "num_stages": 1}
            for block in (1024, 2048, 4096, 8192) if block >= topk_max for w in (4, 8)]


def sample_default_config(problem: dict) -> dict:
    topk_max = next_power_of_2(max(problem.get("max_top_k", 64), 1))
    return {"constexprs": {"BLOCK_V": max(4096, topk_max), "TOPK_MAX": topk_max}, "num_warps": 4, "num_stages": 1}

"""A small, explainable cost model that ranks kernel configs without a GPU.

The kernel-selection pass asks `rank(estimator, problem, candidates, target)`
for each op and M bucket whose kernel family's registry record names an
estimator (`KernelFamily.cost_model`, a key of `ESTIMATORS`), keeps the
first config that also passes the target's resource probe, and records the
winner's `reason` in the decision log. The model is a roofline with the few effects that decide GEMM configs
on real GPUs; it is meant to order candidates sanely, not to predict
microseconds:

* bytes: the weight once per group of GROUP_SIZE_M row tiles (L2 catches
  reuse inside a group), the activations once per column tile, the output,
  and split-K's fp32 partials written and read back by the reduce kernel.
  All are charged at HBM bandwidth; for prefill the activation re-reads
  mostly hit L2, so large-M estimates are pessimistic in absolute terms but
  still rank tile shapes the right way (fewer, larger tiles re-read less);
* memory time = bytes / (HBM bandwidth x the fraction the launch can
  saturate): by Little's law a GPU needs about bandwidth x DRAM latency bytes
  in flight, and each resident program keeps num_stages K-steps of its
  tiles in flight. Few programs (M = 1 with wide tiles) cannot saturate HBM,
  which is what split-K and narrow tiles fix;
* compute time = padded flops (whole BLOCK_M x BLOCK_N tiles, so M = 1 in a
  64-row tile costs 64 rows) / (peak x the share of compute units busy,
  counting the idle units of a partial last wave);
* time = max(memory, compute) + a quarter of the smaller (loads and MMAs
  overlap imperfectly inside a program) + a fixed cost per kernel launch and
  per wave of programs, doubled when the tile likely spills registers;
* resources: a config whose operand tiles exceed the target's LDS gets an
  infinite time and a "does not fit" reason; LDS, warps and registers bound
  how many programs a compute unit holds (`occupancy`).

`target` is duck-typed: `name`, `num_compute_units`, `hbm_gbps`, `lds_bytes`
(per program) and `warp_size` are read. Peak matrix throughput is not a
target field yet; `PEAK_TFLOPS_16BIT` below states the figure used per target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

# Dense bf16/fp16 matrix peak (TFLOP/s) from vendor specifications.
PEAK_TFLOPS_16BIT = {
    "gfx1201": 195.0,   # RX 9070 XT, WMMA
    "gfx1151": 59.0,    # Radeon 8060S, WMMA
    "gfx942": 1307.0,   # MI300X, MFMA
    "gfx950": 2500.0,   # MI355X, MFMA
    "sm90": 989.0,      # H100 SXM, wgmma
    "sm89": 362.0,      # L40S
    "sm80": 312.0,      # A100
}
GUESSED_TFLOPS_PER_CU = 2.0  # for a target missing from the table; the reason says so
FP32_SLOWDOWN = 8.0          # IEEE fp32 dots run on vector ALUs, not the matrix units
MAX_WARPS_PER_CU = {"sm90": 64}  # resident warps per CU/SM; 32 for the AMD targets
DEFAULT_MAX_WARPS_PER_CU = 32
REGISTER_FILE_BYTES = {"gfx942": 512 * 1024, "gfx950": 512 * 1024}  # per CU/SM
DEFAULT_REGISTER_FILE_BYTES = 256 * 1024
MAX_REGS_PER_THREAD = 256    # beyond this the compiler spills
SPILL_SLOWDOWN = 2.0
DRAM_LATENCY_US = 1.0        # Little's law: bytes in flight needed = bandwidth x latency
LAUNCH_US = 2.0              # one kernel node of a replayed graph
WAVE_US = 0.5                # fill and drain of one wave of programs
OVERLAP_LOSS = 0.25          # share of the smaller of memory/compute time that does not overlap

ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e4m3fnuz": 1}


@dataclass(frozen=True)
class Estimate:
    bytes_moved: int
    flops: int          # padded: whole tiles
    tiles: int          # programs launched by the main kernel
    waves: int          # ceil(tiles / compute units)
    occupancy: int      # programs resident per compute unit; 0: does not fit
    est_time_us: float  # math.inf when the config cannot run on the target
    reason: str         # one line, for the decision log

    @property
    def is_feasible(self) -> bool:
        return math.isfinite(self.est_time_us)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _peak_tflops(target, dtype: str) -> tuple[float, str]:
    """(peak TFLOP/s for dots on `dtype`, note for the reason string)."""
    peak = PEAK_TFLOPS_16BIT.get(target.name)
    note = ""
    if peak is None:
        peak = GUESSED_TFLOPS_PER_CU * target.num_compute_units
        note = f" (peak guessed at {peak:.0f} TFLOP/s: {target.name} not in PEAK_TFLOPS_16BIT)"
    if dtype == "float32":
        peak /= FP32_SLOWDOWN
    return peak, note


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def lds_bytes_per_program(config: dict, dtype: str, target) -> int:
    """LDS / shared memory for the operand tiles of one GEMM program.

    AMD's stream pipeliner holds one stage in registers and num_stages - 1 in
    LDS; NVIDIA's holds all num_stages in shared memory. Both match
    `metadata.shared` of Triton 3.9 cross-compiles (gfx1201 exactly; sm90 for
    tiles of 64+ rows, an upper bound below that)."""
    c = config["constexprs"]
    num_stages = config["num_stages"]
    is_amd = getattr(target, "backend", None) == "hip" or target.name.startswith("gfx")
    buffers = max(1, num_stages - 1) if is_amd else num_stages
    return buffers * (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * ELEMENT_BYTES[_dtype_name(dtype)]


def _estimate_gemm(problem: dict, config: dict, target, *, out_bytes_per_elt: float | None = None) -> Estimate:
    M, N, K = problem["M"], problem["N"], problem["K"]
    dtype = _dtype_name(problem.get("dtype", "bfloat16"))
    elt = ELEMENT_BYTES[dtype]
    out_elt = out_bytes_per_elt or elt
    c = config["constexprs"]
    block_m, block_n, block_k = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    group_m, split_k = c.get("GROUP_SIZE_M", 1), c.get("SPLIT_K", 1)
    num_warps, num_stages = config["num_warps"], config["num_stages"]
    num_cu = target.num_compute_units

    m_tiles, n_tiles = math.ceil(M / block_m), math.ceil(N / block_n)
    tiles = m_tiles * n_tiles * split_k
    waves = math.ceil(tiles / num_cu)

    lds_per_program = lds_bytes_per_program(config, dtype, target)
    max_warps = MAX_WARPS_PER_CU.get(target.name, DEFAULT_MAX_WARPS_PER_CU)
    # Registers per thread: the fp32 accumulator, one stage of operands, ~32 for addresses and masks.
    threads = num_warps * target.warp_size
    regs = (block_m * block_n + (block_m + block_n) * block_k * elt // 4) // threads + 32
    register_file = REGISTER_FILE_BYTES.get(target.name, DEFAULT_REGISTER_FILE_BYTES)
    occupancy = min(target.lds_bytes // lds_per_program, max_warps // num_warps,
                    max(1, register_file // (min(regs, MAX_REGS_PER_THREAD) * 4 * threads)))
    if occupancy == 0:
        why = (f"needs {lds_per_program // 1024} KiB LDS per program, {target.name} has {target.lds_bytes // 1024} KiB"
               if lds_per_program > target.lds_bytes else f"{num_warps} warps exceed {max_warps} per CU")
        return Estimate(0, 0, tiles, waves, 0, math.inf, f"does not fit: {why}")

    # HBM traffic.
    weight_reads = math.ceil(m_tiles / min(group_m, m_tiles))
    bytes_weight = N * K * elt * weight_reads
    bytes_act = M * K * elt * n_tiles
    bytes_partials = 2 * split_k * M * N * 4 if split_k > 1 else 0
    bytes_moved = int(bytes_weight + bytes_act + M * N * out_elt + bytes_partials)

    # Memory time: can the launch keep enough bytes in flight?
    resident = min(tiles, num_cu * occupancy)
    in_flight_per_program = num_stages * (min(block_m, M) + block_n) * block_k * elt  # masked rows load nothing
    needed_in_flight = target.hbm_gbps * 1e3 * DRAM_LATENCY_US  # (bytes/us) x us
    bw_fraction = min(1.0, resident * in_flight_per_program / needed_in_flight)
    mem_us = bytes_moved / (target.hbm_gbps * 1e3 * bw_fraction)  # GB/s = 1e3 bytes/us

    # Compute time on padded tiles, on the share of CUs that have work.
    flops = 2 * (m_tiles * block_m) * (n_tiles * block_n) * K
    peak, peak_note = _peak_tflops(target, dtype)
    cu_busy = tiles / (waves * num_cu)
    compute_us = flops / (peak * 1e6 * cu_busy)  # TFLOP/s = 1e6 flop/us

    launches = 2 if split_k > 1 else 1
    overhead_us = launches * LAUNCH_US + waves * WAVE_US
    est_us = max(mem_us, compute_us) + OVERLAP_LOSS * min(mem_us, compute_us) + overhead_us
    if regs > MAX_REGS_PER_THREAD:
        est_us *= SPILL_SLOWDOWN

    bound = "memory" if mem_us >= compute_us else "compute"
    notes = []
    if M < block_m:
        notes.append(f"M={M} fills {M}/{block_m} tile rows")
    if group_m > m_tiles:
        notes.append(f"GROUP_SIZE_M={group_m} over {m_tiles} row tile(s) reuses nothing")
    if regs > MAX_REGS_PER_THREAD:
        notes.append(f"~{regs} registers per thread: likely spills (x{SPILL_SLOWDOWN:g})")
    if split_k > 1:
        notes.append(f"split-K {split_k}: +{_fmt_bytes(bytes_partials)} partials, +1 launch")
    reason = (f"{bound}-bound {est_us:.1f} us: {_fmt_bytes(bytes_moved)} at {bw_fraction:.0%} of "
              f"{target.hbm_gbps:.0f} GB/s ({resident} programs x {in_flight_per_program // 1024} KiB in flight) "
              f"= {mem_us:.1f} us, compute {compute_us:.1f} us{peak_note}; "
              f"{tiles} tiles = {waves} wave(s) on {num_cu} CUs, {occupancy}/CU resident"
              + "".join(f"; {n}" for n in notes))
    return Estimate(bytes_moved, flops, tiles, waves, occupancy, est_us, reason)


def _estimate_logits(problem: dict, config: dict, target) -> Estimate:
    return _estimate_gemm(problem, config, target, out_bytes_per_elt=4)  # float32 logits


def _estimate_gemm_gated(problem: dict, config: dict, target) -> Estimate:
    """A gated GEMM program (BLOCK_N gate and BLOCK_N up columns) is a gemm tile 2 x BLOCK_N wide of the
    merged [2I, K] GEMM: the same tiles, LDS, registers, weight and activation bytes; it writes [M, I],
    half the merged output (charged as half an element per merged column). A WIDE config (measured
    only, see gemm_gated.py) is that merged tile as it stands: its BLOCK_N already counts both halves."""
    c = config["constexprs"]
    merged = {**problem, "N": 2 * problem["N"]}
    if c.get("UNFUSED"):  # the merged GEMM writing [M, 2I] (the activation launch is not modelled)
        return _estimate_gemm(merged, config, target)
    half = ELEMENT_BYTES[_dtype_name(problem.get("dtype", "bfloat16"))] / 2
    if c.get("WIDE"):
        return _estimate_gemm(merged, config, target, out_bytes_per_elt=half)
    wide = {**config, "constexprs": {**c, "BLOCK_N": 2 * c["BLOCK_N"]}}
    return _estimate_gemm(merged, wide, target, out_bytes_per_elt=half)


MXFP4_PATH_NOTE = ("MXFP4 as W4A16: blocks and e8m0 scales read as stored (no re-layout) and decoded in the "
                   "GEMM's inner loop to bf16 matrix instructions")
MXFP4_GEMV_NOTE = ("MXFP4 GEMV: blocks and e8m0 scales read as stored, decoded by bit shifts into float32 "
                   "multiply-adds (no matrix instruction)")
MXFP4_DEQUANT_NOTE = ("MXFP4 dequantized once per step into a scratch of {scratch} (x's dtype), then the dense "
                      "grouped GEMM with bf16 matrix instructions")
# What Triton 3.9 emits for tl.dot_scaled (tests/test_kernels_moe.py checks it): gfx950's scaled MFMA only for
# fp8/fp4 activations; a bf16 x e2m1 dot_scaled is lowered to bf16 MFMA, as on gfx942, RDNA and sm90.
MXFP4_NATIVE_NOTE = ("; gfx950's v_mfma_scale_f32_*_f8f6f4 (tl.dot_scaled) would need the activations in "
                     "fp8/fp4 too, which the reference does not round to: not used")
# Vector-ALU instructions per decoded MXFP4 weight element. W4A16 (moe_gemm.py): ~33, from the H100 at
# GPT-OSS-20B batch 1 (129 us for 4 experts' 99.5M elements, bench/results/2026-12-07-h100-s16).
W4A16_DECODE_OPS = 33.0
# GEMV (moe_gemv.py, session 17's kernel), counted in the loop body of its sm90 PTX (Triton 3.9, gate/up at
# GPT-OSS-20B's shapes): 533 instructions per step for 64 weight elements per thread at 1 row, 769 at 2 rows,
# 283 for 32 elements at 1 row, 600 for 32 at 4 rows. Per element: the nibble decode and its 2**126 scaling
# (shared by the rows), then per block row the activation's load and widening, the multiply-add and the
# group's partial sum (3.6, not the single FMA the session-16 model charged: padding rows at T=1 cost
# their full share, 2x16x256 measured 1.37x 1x16x256); plus ~33 per loop step (addresses, masks, the
# scale bytes) spread over the elements a thread holds. That last term is left out: 1x16x512 (128 elements
# per thread) and 1x16x256 (64) measured the same (61.1 and 61.2 us), so it is hidden behind the loads.
GEMV_DECODE_OPS = 4.7
GEMV_ROW_OPS = 3.6
# The share of the vector ALUs' issue rate the GEMV loop sustains: its one-stage loop stalls on each step's
# loads between bursts of arithmetic. Fit on session 17's H100 run: the evenly spread 1-row tiles ran
# 52.3-56.2 us at T=1 where the instruction counts at full issue give 43 us (about 11 us of it launches).
GEMV_ALU_EFFICIENCY = 0.78
# GEMV registers per thread (sm90 ptxas, Triton 3.9, the gate/up kernel): ~32 for addresses and masks plus,
# per int32 word a thread holds in a step, 8 at one block row (the word, its decoded nibbles) and 12 more per
# further row (its 8 widened activations, the partial); 1 row: 47/63/91 registers at 2/4/8 words, 2 rows
# 110 at 4, 4 rows 115 at 2. gfx1151/gfx1201's VGPR counts are within 15% of these. They bound how many
# programs an SM holds (a 1x4x512 program needs 47: 10 of 4 warps; 1x16x1024 on 8 warps 108: 2).
GEMV_BASE_REGS = 32
GEMV_REGS_PER_WORD = 8
GEMV_REGS_PER_WORD_ROW = 12
# Vector-ALU lanes x clock (MHz) per CU / SM: instructions per microsecond (sm90: 128 lanes at 1755 MHz;
# CDNA: 64 lanes; RDNA 3.5/4: 64 lanes dual-issued).
ALU_OPS_PER_CU_US = {"sm90": 128 * 1755, "gfx942": 64 * 2100, "gfx950": 64 * 2400, "gfx1201": 128 * 2900,
                     "gfx1151": 128 * 2900}
DEFAULT_ALU_OPS_PER_CU_US = 64 * 2000
# DRAM efficiency by the contiguous bytes each weight row gives per K step (sm90, dense bf16 decode at
# GPT-OSS-20B / Qwen3-30B-A3B shapes: 64 B rows ran at ~48% of a copy, 128 B at ~75%, 256 B at ~92-100%).
FULL_ROW_SEGMENT_BYTES = 256


def _row_segment_efficiency(segment_bytes: float) -> float:
    return min(1.0, segment_bytes / FULL_ROW_SEGMENT_BYTES) ** 0.6


def moe_weight_bytes_per_expert(problem: dict) -> float:
    """Bytes of one expert's w13 [2I, H] and w2 [H, I] as stored (MXFP4: half a byte + a scale per 32)."""
    elements = 3 * problem["I"] * problem["H"]
    if problem["weight_format"] == "mxfp4":
        return elements * (0.5 + 1 / 32)
    if problem["weight_format"] == "fp8_block":  # a byte and a float32 scale per 128x128 block
        return elements * (1 + 4 / (128 * 128))
    return elements * ELEMENT_BYTES[_dtype_name(problem["dtype"])]


def _gemv_register_occupancy(config: dict, target) -> int:
    """Programs of an MXFP4 GEMV config one CU / SM holds by registers (see GEMV_BASE_REGS)."""
    c = config["constexprs"]
    threads = config["num_warps"] * target.warp_size
    words = c["BLOCK_N"] * c["BLOCK_K"] / 8 / threads  # int32 words of one weight row block per thread per step
    regs = GEMV_BASE_REGS + words * (GEMV_REGS_PER_WORD + GEMV_REGS_PER_WORD_ROW * (c["BLOCK_M"] - 1))
    register_file = REGISTER_FILE_BYTES.get(target.name, DEFAULT_REGISTER_FILE_BYTES)
    return max(1, int(register_file // (min(regs, MAX_REGS_PER_THREAD) * 4 * threads)))


def _gemv_alu_us(blocks: int, H: int, I: int, block_n: int, ops: float, alu_rate: float, num_cu: int) -> float:
    """Vector-ALU time of the two GEMV launches, each on its own: gate/up ([2I, H] per expert, I/BLOCK_N
    programs per row tile) then down ([H, I], H/BLOCK_N). A launch lasts as long as its busiest CU, which
    gets ceil(programs / CUs) programs; summing both launches' programs before rounding would hide that
    (720 + 720 programs of 1x16 tiles on 132 SMs: 11 of 10.9 per SM together, but 6 of 5.45 in each)."""
    total = 0.0
    for programs, elements in ((blocks * math.ceil(I / block_n), blocks * 2 * I * H),
                               (blocks * math.ceil(H / block_n), blocks * H * I)):
        busy = programs / (math.ceil(programs / num_cu) * num_cu)
        total += elements * ops / (alu_rate * GEMV_ALU_EFFICIENCY * busy)
    return total


def _estimate_moe(problem: dict, config: dict, target) -> Estimate:
    """The fused MoE (rdnac.kernels.moe). moe_route: one row of logits per program. moe_experts: bytes
    are the weights of the active experts only (`rdnac.ir.moe.expected_active_experts`) plus the routed
    activations ([T*k, I] written and read, [T*k, H] float32 written and read); flops are padded to
    whole BLOCK_M row tiles per active expert; the gate/up GEMM's operand tiles bound LDS
    (`moe_configs.lds_bytes`), and a tile over the target's LDS does not fit. MXFP4 adds the decode's
    vector-ALU time per row tile (W4A16 and GEMV), or, with DEQUANT, the bytes of decoding every expert
    into the scratch and reading the active ones back (the MXFP4 path is chosen by this comparison:
    decode per row tile against once per step)."""
    from rdnac.ir.moe import expected_active_experts
    from rdnac.kernels.moe_configs import lds_bytes

    T, num_cu = problem["M"], target.num_compute_units
    if problem["op"] == "moe_route":
        bytes_moved = T * problem["E"] * 4 + T * problem["top_k"] * 8
        est = LAUNCH_US + bytes_moved / (target.hbm_gbps * 1e3)
        return Estimate(bytes_moved, 0, T, math.ceil(T / num_cu), 1, est,
                        f"{T} rows of {problem['E']} logits, {_fmt_bytes(bytes_moved)}")
    c = config["constexprs"]
    block_m, block_n, block_k = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    H, I, E, k = problem["H"], problem["I"], problem["E"], problem["top_k"]
    elt = ELEMENT_BYTES[_dtype_name(problem["dtype"])]
    is_mxfp4 = problem["weight_format"] == "mxfp4"
    is_gemv, is_dequant = is_mxfp4 and c.get("GEMV", False), is_mxfp4 and c.get("DEQUANT", False)
    lds = lds_bytes(config, problem, target.name)
    active = expected_active_experts(T, k, E)
    blocks = math.ceil(active) * math.ceil(T * k / active / block_m)  # row tiles of the sorted list
    tiles = blocks * (math.ceil(I / block_n) + math.ceil(H / block_n))
    waves = math.ceil(tiles / num_cu)
    if lds > target.lds_bytes:
        return Estimate(0, 0, tiles, waves, 0, math.inf,
                        f"does not fit: needs {lds // 1024} KiB LDS per program ({lds} bytes), "
                        f"{target.name} has {target.lds_bytes // 1024} KiB")
    expert_elements = 3 * I * H
    weight_bytes = active * moe_weight_bytes_per_expert(problem)
    launches = 5
    if is_dequant:  # every expert decoded (read 4-bit, written 16-bit), the active ones read back
        weight_bytes = E * moe_weight_bytes_per_expert(problem) + (E + active) * expert_elements * elt
        launches += 2
    act_bytes = T * H * elt * 2 + T * k * (2 * I * elt + 2 * H * 4)
    bytes_moved = int(weight_bytes + act_bytes)
    occupancy = max(1, min(target.lds_bytes // max(lds, 1), MAX_WARPS_PER_CU.get(target.name, DEFAULT_MAX_WARPS_PER_CU)
                           // config["num_warps"]))
    if is_gemv:  # no LDS to speak of: registers bound the resident programs
        occupancy = min(occupancy, _gemv_register_occupancy(config, target))
    resident = min(tiles, num_cu * occupancy)
    stored_bytes = 0.5 if is_mxfp4 and not is_dequant else elt  # per weight element as the GEMM loads it
    if problem["weight_format"] == "fp8_block":  # FP8 weights, and the activations quantized in two launches
        stored_bytes = 1
        launches += 2 * (problem.get("act_scheme") != "none")
    rows = min(block_m, math.ceil(T * k / active))  # padding rows load nothing
    in_flight = config["num_stages"] * (rows * block_k * elt + 2 * block_k * block_n * stored_bytes)
    bw_fraction = (min(1.0, resident * in_flight / (target.hbm_gbps * 1e3 * DRAM_LATENCY_US))
                   * _row_segment_efficiency(block_k * stored_bytes))
    mem_us = bytes_moved / (target.hbm_gbps * 1e3 * bw_fraction)
    flops = 2 * blocks * block_m * 3 * I * H
    peak, peak_note = _peak_tflops(target, _dtype_name(problem["dtype"]))
    busy = tiles / (waves * num_cu)
    alu_us = 0.0
    alu_rate = ALU_OPS_PER_CU_US.get(target.name, DEFAULT_ALU_OPS_PER_CU_US) * num_cu
    if is_gemv:  # decode per element, then per block row (padding rows included: they run the same code)
        alu_us = _gemv_alu_us(blocks, H, I, block_n, GEMV_DECODE_OPS + GEMV_ROW_OPS * block_m, alu_rate, num_cu)
    elif is_mxfp4 and not is_dequant:  # the in-loop decode, once per row tile, on the vector ALUs
        alu_us = blocks * expert_elements * W4A16_DECODE_OPS / (alu_rate * busy)
    compute_us = alu_us + (0.0 if is_gemv else flops / (peak * 1e6 * busy))
    # Deeper pipelines overlap more of the smaller of the two (sm90: 3 stages beat 2 at every measured size,
    # 80.5 against 88.1 us at GPT-OSS-20B batch 1, 1186 against 1589 us at 2048 tokens).
    overlap_loss = OVERLAP_LOSS * 2 / max(2, config["num_stages"])
    # Fill and drain: the dense tiles' few large programs run in waves, each paid for. GEMV programs are
    # small and many are resident (`occupancy`); an SM starts the next as one retires, so a GEMV launch fills
    # and drains once, and its uneven end is the per-launch share of idle SMs in `_gemv_alu_us`. (Charging
    # one WAVE_US per 132 programs made the narrow tiles that measured fastest look slowest: 1x4x512's 5760
    # programs cost 44 us of "waves" in a 52 us kernel.)
    fill_us = 2 * WAVE_US if is_gemv else 2 * waves * WAVE_US
    est_us = max(mem_us, compute_us) + overlap_loss * min(mem_us, compute_us) + launches * LAUNCH_US + fill_us
    bound = "memory" if mem_us >= compute_us else "compute"
    per_token = moe_weight_bytes_per_expert(problem) * k  # batch 1: k experts
    reason = (f"{bound}-bound {est_us:.1f} us: {active:.1f} of {E} experts active, {_fmt_bytes(bytes_moved)} "
              f"at {bw_fraction:.0%} of {target.hbm_gbps:.0f} GB/s = {mem_us:.1f} us, compute {compute_us:.1f} us"
              f"{peak_note}" + (f" (decode {alu_us:.1f} us)" if alu_us else "")
              + f"; {blocks} row tiles of {block_m}, {tiles} tiles"
              + (f", {occupancy}/CU resident; " if is_gemv else f" = {waves} wave(s); ") +
              f"LDS {lds // 1024} KiB; batch 1 reads {_fmt_bytes(per_token)} of expert weights per token")
    if is_gemv:
        reason += "; " + MXFP4_GEMV_NOTE
    elif is_dequant:
        reason += "; " + MXFP4_DEQUANT_NOTE.format(scratch=_fmt_bytes(E * 2 * I * H * elt))
    elif is_mxfp4:
        reason += "; " + MXFP4_PATH_NOTE + (MXFP4_NATIVE_NOTE if target.has_mxfp4 else "")
    return Estimate(bytes_moved, flops, tiles, waves, occupancy, est_us, reason)


def _estimate_attention(problem: dict, config: dict, target) -> Estimate:
    """Paged attention (rdnac.kernels.attention): its model is rdnac/compiler/cost_attention.py."""
    from rdnac.compiler.cost_attention import estimate_attention

    return estimate_attention(problem, config, target)


# Estimators by name; a kernel family's registry record names the one that ranks its configs.
ESTIMATORS: dict[str, Callable[[dict, dict, Any], Estimate]] = {
    "gemm": _estimate_gemm,
    "linear": _estimate_gemm,
    "logits": _estimate_logits,
    "gemm_gated": _estimate_gemm_gated,
    "moe": _estimate_moe,
    "attention": _estimate_attention,
}


def estimate(family: str, problem: dict, config: dict, target) -> Estimate:
    """Estimate one config of a kernel family on `target` (see the module docstring)."""
    if family not in ESTIMATORS:
        raise ValueError(f"cost model requires a family in {sorted(ESTIMATORS)}; got {family!r}; "
                         f"add an estimator to rdnac.compiler.cost_model.ESTIMATORS")
    if target.num_compute_units <= 0:
        raise ValueError(f"cost model requires a GPU target (num_compute_units > 0); got {target.name!r}")
    return ESTIMATORS[family](problem, config, target)


def _simplicity(config: dict) -> tuple:
    # Ties go to the simpler config: no split-K, no grouping, fewer stages and warps.
    c = config["constexprs"]
    return (c.get("SPLIT_K", 1), c.get("GROUP_SIZE_M", 1), config["num_stages"], config["num_warps"])


def rank(family: str, problem: dict, candidates: list[dict], target) -> list[tuple[dict, Estimate]]:
    """Candidates with their estimates, best first; configs that do not fit come last."""
    scored = [(config, estimate(family, problem, config, target)) for config in candidates]
    return sorted(scored, key=lambda item: (item[1].est_time_us, _simplicity(item[0])))

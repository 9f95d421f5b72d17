#!/bin/bash
# Session 18's changes on the GPU, one device call (<= 560 s on an H100; each step its own timeout): the -m gpu
# tests of the kernels refactored or reworked without a GPU (GEMM families on shared tile helpers, MoE expert-row
# helper and refit GEMV pick, gated RMS norm, prefill attention's three key loops, wide-head decode tiles), the
# FP8/INT8 plans, the sampler graphs. Most important first. Results: $OUT/summary.txt and one log per step.
set -u
[ -d /tmp/sp ] || { mkdir -p /tmp/sp && for w in .whl/*.whl; do python3 -m zipfile -e $w /tmp/sp >/dev/null; done; }
export PYTHONPATH=$PWD:/tmp/sp
nvidia-smi --query-gpu=name --format=csv > $OUT/device.txt
t() {  # name, cap seconds, pytest args...
  local name=$1 cap=$2; shift 2
  local s=$(date +%s)
  timeout $cap python3 -m pytest -m gpu -q -rs -p no:cacheprovider "$@" > $OUT/$name.txt 2>&1
  echo "$name rc=$? $(( $(date +%s) - s ))s $(tail -n 1 $OUT/$name.txt)" >> $OUT/summary.txt
}
t gemm 60 tests/test_kernels_gemm.py tests/test_kernels_gemm_fp8.py tests/test_gemm_gated.py
t attention 90 tests/test_kernels_attention.py
t moe 60 tests/test_kernels_moe.py
t gdn 45 tests/test_kernels_gdn.py
t models 120 tests/test_gpu_models.py
t fp8_int8 90 tests/test_fp8_greedy.py tests/test_int8.py
t moe_plans 60 tests/test_moe_plans.py
cat $OUT/device.txt $OUT/summary.txt

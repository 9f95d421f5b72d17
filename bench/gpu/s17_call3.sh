#!/bin/bash
# Session 17, device call 3 (the one device call left): GPU correctness of everything merged this session,
# then the reworked MXFP4 GEMV at decode. Each step has its own time cap; results under $OUT.
set -u
mkdir -p /tmp/sp && for w in .whl/*.whl; do python3 -m zipfile -e $w /tmp/sp >/dev/null; done
export PYTHONPATH=$PWD:/tmp/sp
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/device.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $OUT/device.txt
t() {  # name, cap seconds, pytest args...
  local name=$1 cap=$2; shift 2
  local s=$(date +%s)
  timeout $cap python3 -m pytest -m gpu -q -rs -p no:cacheprovider "$@" > $OUT/$name.txt 2>&1
  echo "$name rc=$? $(( $(date +%s) - s ))s $(tail -n 1 $OUT/$name.txt)" >> $OUT/summary.txt
}
t gdn 70 tests/test_kernels_gdn.py
t fp8_greedy 90 tests/test_fp8_greedy.py
t plans 100 tests/test_plan_files.py tests/test_moe_plans.py tests/test_driver_launch.py
t models 60 tests/test_gpu_models.py -k "grammar_masked or sampled_decode"
t int8 75 tests/test_int8.py -k on_cuda
s=$(date +%s)
timeout 80 python3 bench/moe_layer.py --shapes gpt-oss-20b --tokens 1 --max-configs 24 \
  > $OUT/moe_layer.jsonl 2> $OUT/moe_layer.err
echo "moe_layer rc=$? $(( $(date +%s) - s ))s" >> $OUT/summary.txt
cat $OUT/summary.txt; tail -n 6 $OUT/moe_layer.jsonl

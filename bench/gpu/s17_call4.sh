#!/bin/bash
# Session 17, device call 4 (the last device time): the GDN plan test against the reference interpreter, the
# DeepSeek FP8 block experts with graphs, MoE serving (graphs against eager at concurrency 1/3/17/64).
set -u
mkdir -p /tmp/sp && for w in .whl/*.whl; do python3 -m zipfile -e $w /tmp/sp >/dev/null; done
export PYTHONPATH=$PWD:/tmp/sp
nvidia-smi --query-gpu=name --format=csv > $OUT/device.txt
t() {  # name, cap seconds, pytest args...
  local name=$1 cap=$2; shift 2
  local s=$(date +%s)
  timeout $cap python3 -m pytest -m gpu -q -rs -p no:cacheprovider "$@" > $OUT/$name.txt 2>&1
  echo "$name rc=$? $(( $(date +%s) - s ))s $(tail -n 1 $OUT/$name.txt)" >> $OUT/summary.txt
}
t gdn 45 tests/test_kernels_gdn.py
t deepseek_fp8 80 tests/test_deepseek.py -k fp8_block_gpu
t moe_serving 70 tests/test_moe_serving.py
cat $OUT/summary.txt

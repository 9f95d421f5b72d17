#!/bin/bash
# Session 17, device call 1: the GPU tests left unrun in session 16, then the MoE layer bench.
set -u
mkdir -p /tmp/sp && for w in .whl/*.whl; do python3 -m zipfile -e $w /tmp/sp >/dev/null; done
export PYTHONPATH=$PWD:/tmp/sp
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/device.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $OUT/device.txt
for f in test_kernels_mla test_kernels_gdn test_kernels_moe test_moe_plans; do
  timeout 125 python3 -m pytest -m gpu -x -q tests/$f.py -p no:cacheprovider > $OUT/$f.txt 2>&1
  echo "$f rc=$?" >> $OUT/summary.txt
done
timeout 80 python3 bench/moe_layer.py --shapes gpt-oss-20b qwen3-30b-a3b --tokens 1 16 64 2048 \
  > $OUT/moe_layer.jsonl 2> $OUT/moe_layer.err
echo "moe_layer rc=$?" >> $OUT/summary.txt
cat $OUT/summary.txt; tail -5 $OUT/*.txt

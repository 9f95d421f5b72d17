#!/bin/bash
# Session 17, device call 2: the GDN alignment fix, the reworked MXFP4 GEMV (tests + every GEMV tile at decode).
set -u
mkdir -p /tmp/sp && for w in .whl/*.whl; do python3 -m zipfile -e $w /tmp/sp >/dev/null; done
export PYTHONPATH=$PWD:/tmp/sp
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/device.txt
for f in test_kernels_gdn test_kernels_moe test_plan_files; do
  timeout 150 python3 -m pytest -m gpu -q tests/$f.py -p no:cacheprovider > $OUT/$f.txt 2>&1
  echo "$f rc=$?" >> $OUT/summary.txt
done
timeout 150 python3 -m pytest -m gpu -q -rs tests/test_gpu_models.py -k "grammar_masked or sampled_decode or seed_gives" \
  -p no:cacheprovider > $OUT/test_gpu_models.txt 2>&1
echo "test_gpu_models rc=$?" >> $OUT/summary.txt
timeout 200 python3 bench/moe_layer.py --shapes gpt-oss-20b --tokens 1 16 64 --max-configs 24 \
  > $OUT/moe_layer.jsonl 2> $OUT/moe_layer.err
echo "moe_layer rc=$?" >> $OUT/summary.txt
cat $OUT/summary.txt; tail -n 12 $OUT/moe_layer.jsonl

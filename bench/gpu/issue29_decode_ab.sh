#!/bin/bash
# Issue 29, one device call (<= 600 s on an H100): bench/decode_ab29.py -- Qwen3-8B-shaped FP8 block batch 1
# with early_weight_loads / fuse_act_linear on, each off and both off; FP8 KV vs bf16 KV at context 8192;
# SmolLM2-135M-shaped and Qwen3-8B-shaped bf16 batch 1. Results: $OUT/ab29/{results.jsonl,table.md}.
set -u
[ -d /tmp/sp ] || { mkdir -p /tmp/sp && for w in .whl/*.whl; do python3 -m zipfile -e $w /tmp/sp >/dev/null; done; }
export PYTHONPATH=$PWD:/tmp/sp
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/device.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $OUT/device.txt
timeout 575 python3 bench/decode_ab29.py --out $OUT/ab29 --budget-s 550 > $OUT/ab29.log 2>&1
echo "decode_ab29 rc=$?"
cat $OUT/device.txt $OUT/ab29/table.md; grep -E '^#|Error|error|skipped' $OUT/ab29.log | tail -20

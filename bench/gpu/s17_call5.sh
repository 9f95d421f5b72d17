#!/bin/bash
# Session 17, device call 5: the DeepSeek FP8 block plan with graphs after the alignment fix.
set -u
mkdir -p /tmp/sp && for w in .whl/*.whl; do python3 -m zipfile -e $w /tmp/sp >/dev/null; done
export PYTHONPATH=$PWD:/tmp/sp
timeout 50 python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_deepseek.py -k fp8_block_gpu > $OUT/deepseek_fp8.txt 2>&1
echo "deepseek_fp8 rc=$? $(tail -n 1 $OUT/deepseek_fp8.txt)"

#!/bin/bash
# Issue 29 item 3 (prefill attention), one device call each (<= 560 s on an H100; each step its own timeout):
#   bash bench/gpu/s18_prefill.sh          the -m gpu prefill attention test (2k, 16k, an 8k chunk after an 8k
#                                          prefix, against the reference); prefill attention TFLOP/s, new kernel
#                                          against the one before it (bench/prefill_attention29.py); the whole
#                                          Qwen3-8B-shaped bf16 prefill 2048 (rdnac bench, with batch-1 decode)
#   bash bench/gpu/s18_prefill.sh llama    Llama-3.1-8B-shaped FP8 block and bf16 batch-1 decode
#                                          (bench/decode_ab29.py --phases llama-fp8 llama-bf16)
# Results under $OUT: summary.txt, device.txt, one log per step, attn29/{results.jsonl,table.md},
# prefill/ (rdnac bench's results.jsonl), ab29-llama/{results.jsonl,table.md}.
set -u
part=${1:-prefill}
[ -d /tmp/sp ] || { mkdir -p /tmp/sp && for w in .whl/*.whl; do python3 -m zipfile -e $w /tmp/sp >/dev/null; done; }
export PYTHONPATH=$PWD:/tmp/sp
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/device.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $OUT/device.txt
if [ "$part" = llama ]; then
  timeout 540 python3 bench/decode_ab29.py --phases llama-fp8 llama-bf16 --out $OUT/ab29-llama --budget-s 520 \
    > $OUT/ab29-llama.log 2>&1
  echo "decode_ab29 llama rc=$?" >> $OUT/summary.txt
  cat $OUT/device.txt $OUT/summary.txt $OUT/ab29-llama/table.md; grep -E '^#|Error|error|skipped' $OUT/ab29-llama.log | tail -20
  exit 0
fi
timeout 150 python3 -m pytest -m gpu -x -q tests/test_kernels_attention.py -k prefill_long_prompts_against_reference \
  -p no:cacheprovider > $OUT/gpu_test.txt 2>&1
echo "gpu prefill attention test rc=$?" >> $OUT/summary.txt
timeout 150 python3 bench/prefill_attention29.py --out $OUT/attn29 > $OUT/attn29.log 2>&1
echo "prefill_attention29 rc=$?" >> $OUT/summary.txt
timeout 240 python3 -m rdnac.cli.main bench --out $OUT/prefill --shape qwen3-8b --scheme bf16 --batch 1 \
  --prefill 2048 > $OUT/prefill.log 2>&1
echo "rdnac bench qwen3-8b prefill 2048 rc=$?" >> $OUT/summary.txt
cat $OUT/device.txt $OUT/summary.txt; tail -3 $OUT/gpu_test.txt; cat $OUT/attn29/table.md
grep -h '"prefill_tokens"' $OUT/prefill/*.jsonl 2>/dev/null | tail -2; tail -5 $OUT/prefill.log

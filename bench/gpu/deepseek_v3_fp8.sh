#!/bin/bash
# DeepSeek-V3 FP8 block on the GPU machine (issue 26): the gpu test of the FP8 block experts (decisive tiny V3
# against transformers, decode through CUDA graphs against the interpreter), then decode TPOT of a V3-shaped
# plan with 2 layers (1 dense, 1 MoE of 256 FP8 experts) at batch 1 and 64. Two device calls (10 min each):
#   bash bench/gpu/deepseek_v3_fp8.sh test
#   bash bench/gpu/deepseek_v3_fp8.sh bench      # ~16 GB checkpoint + ~16 GB plan under /tmp/v3fp8
set -u
mkdir -p /tmp/sp && for w in .whl/*.whl; do python3 -m zipfile -e $w /tmp/sp >/dev/null; done
export PYTHONPATH=$PWD:/tmp/sp
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/device.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $OUT/device.txt
if [ "${1:-test}" = test ]; then
  timeout 500 python3 -m pytest -m gpu -x -q -s tests/test_deepseek.py -k fp8_block_gpu -p no:cacheprovider \
    > $OUT/test_deepseek_fp8_gpu.txt 2>&1
  echo "test_deepseek fp8 gpu rc=$?" | tee -a $OUT/summary.txt
  tail -5 $OUT/test_deepseek_fp8_gpu.txt
else
  timeout 560 python3 bench/deepseek_v3_fp8.py /tmp/v3fp8 --layers 2 --batch 1 64 --context 256 \
    > $OUT/deepseek_v3_fp8.jsonl 2> $OUT/deepseek_v3_fp8.err
  echo "deepseek_v3_fp8 rc=$?" | tee -a $OUT/summary.txt
  cat $OUT/deepseek_v3_fp8.jsonl; tail -5 $OUT/deepseek_v3_fp8.err
fi

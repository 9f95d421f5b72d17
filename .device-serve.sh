set -x
mkdir -p /tmp/sp && for w in .whl/*.whl; do python3 -m zipfile -e $w /tmp/sp >/dev/null; done
export PYTHONPATH=$PWD:/tmp/sp
python3 -c "import fastapi, uvicorn, pydantic; print(fastapi.__version__, uvicorn.__version__, pydantic.__version__)"
nvidia-smi --query-gpu=name --format=csv
timeout 420 python3 -m pytest -q -x -m gpu -rs tests/test_gpu_models.py -k "seed" 2>&1 | tee $OUT/seed.txt | tail -30

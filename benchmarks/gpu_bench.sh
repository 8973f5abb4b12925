#!/usr/bin/env bash
# GPU speed in one table (training per precision, sampling per solver, Inception features), under 8 minutes on
# one H100/H200; writes benchmarks/results/gpu_bench-<device>.json. Options: see `--help` (--smoke --device=cpu: seconds).
set -euo pipefail
export PYTHONUNBUFFERED=1
exec python "$(dirname "$0")/gpu_bench.py" "$@"

#!/usr/bin/env bash
# One short distillation job on CUDA (bf16) against the CPU, on a GPU machine:
#   bash benchmarks/gpu_smoke.sh
# Needs torch with CUDA, numpy and pydantic (the job-spec schemas). Where pydantic is missing and
# nothing can be fetched, carry its wheels (pydantic, pydantic-core, annotated-types,
# typing-inspection, typing-extensions) and point PYTHONPATH at them first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHONUNBUFFERED=1 "${PYTHON:-python3}" benchmarks/gpu_smoke.py "$@"

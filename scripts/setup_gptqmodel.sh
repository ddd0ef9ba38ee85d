#!/usr/bin/env bash
# Create ./.venv-gptqmodel: GPTQModel (the PyTorch reference pipeline) on the CPU torch 2.13 wheel,
# isolated from the project's own .venv. Used as the named baseline by benchmarks/ and as the oracle
# of the Hugging Face interop tests (which skip, saying why, when this venv is absent).
# GPTQModel 7.x declares torch>=2.14.1 but runs on 2.13 CPU: install it --no-deps plus its
# requirements minus torch (docs/environment.md). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
V=.venv-gptqmodel
[ -x $V/bin/python ] || "$PYTHON" -m venv $V
pip() { $V/bin/python -m pip install -q --disable-pip-version-check "$@"; }
pip torch==2.13.0
pip "transformers>=5" safetensors accelerate threadpoolctl packaging device-smi protobuf pillow \
    requests pypcre tokenicer logbar jinja2 datasets dill defuser gguf sentencepiece numpy
pip --no-deps "gptqmodel==7.7.0"
# transformers loads GPTQ folders through Optimum's GPTQQuantizer (which runs GPTQModel's kernels):
# without optimum, plain AutoModelForCausalLM.from_pretrained of a GPTQ folder raises ImportError.
pip --no-deps "optimum==2.3.0"
$V/bin/python -c "import gptqmodel, torch; print('gptqmodel', gptqmodel.__version__, 'torch', torch.__version__)"

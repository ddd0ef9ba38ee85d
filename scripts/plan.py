#!/usr/bin/env python
"""Plan a quantization run on a TPU slice before it runs (compiled, no TPU needed). See --help and
gptq_jax/cli/plan.py. Run it with .venv-tpu/bin/python (scripts/setup_tpu.sh)."""

import sys

from gptq_jax.cli.plan import main

if __name__ == "__main__":
  sys.exit(main())

#!/usr/bin/env python
"""Quantize a LLaMA-family model with GPTQ. See `--help` and gptq_jax/cli/quantize.py."""

import os
import sys

from gptq_jax.cli.quantize import main

if __name__ == "__main__":
  status = main()
  if status:  # the error line is printed; skip orbax's noisy teardown (gptq_jax/integrity.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  sys.exit(status)

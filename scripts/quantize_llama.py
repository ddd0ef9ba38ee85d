#!/usr/bin/env python
"""Quantize a LLaMA-family model with GPTQ. See `--help` and gptq_jax/cli/quantize.py."""

import sys

from gptq_jax.cli.quantize import main

if __name__ == "__main__":
  sys.exit(main())

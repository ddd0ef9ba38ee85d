#!/usr/bin/env python
"""Export a quantized checkpoint without re-quantizing, or check which engines can run a folder.
See `--help` and gptq_jax/cli/export.py."""

from gptq_jax.cli.export import script_main

if __name__ == "__main__":
  script_main()

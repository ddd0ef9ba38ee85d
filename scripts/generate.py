#!/usr/bin/env python
"""Generate text from a model (orbax checkpoint, HF GPTQ / float folder, .gguf or a name).

See `--help` and gptq_jax/cli/generate.py."""

import sys

from gptq_jax.cli.generate import main

if __name__ == "__main__":
  sys.exit(main())

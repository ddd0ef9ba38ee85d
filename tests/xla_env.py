"""XLA_FLAGS of the suite and of the subprocesses it starts.

LLVM's optimization passes cost the suite's many small programs more compile time than they save
in run time: four compile-heavy files (driver, gptq, decode, kernels reference) took 219 s with
these flags against 285 s without, one after the other on the 2-core machine. The real-model
work is the other way round (the notebook's SmolLM2 steps: 81 s with them, 69 s without), a
minority of the suite. No fast-math; the results may differ in the last bits from an optimized
build (the notebook's GPTQ perplexity 29.99 against 29.81), and every test compares runs compiled
with the same flags. The TPU compile tests do not get them (their figures
are the TPU compiler's own, flags as a user has them).
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def one_device_flags() -> str:
  """This process's XLA_FLAGS without the forced host device count: a subprocess that sees the
  CPU as one device, as a user's does, compiled like the rest of the suite."""
  return " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)

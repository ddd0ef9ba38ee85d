"""XLA_FLAGS of the suite and of the subprocesses it starts.

Most of the suite's time is XLA:CPU compiling small programs; LLVM's optimization passes are most
of that and buy nothing for programs this small (about 30 % of the suite's wall time measured on
the 2-core machine). No flag here changes the arithmetic's semantics (no fast-math; every test
compares runs compiled with the same flags). The TPU compile tests do not get them (their figures
are the TPU compiler's own, flags as a user has them).
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def one_device_flags() -> str:
  """This process's XLA_FLAGS without the forced host device count: a subprocess that sees the
  CPU as one device, as a user's does, compiled like the rest of the suite."""
  return " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)

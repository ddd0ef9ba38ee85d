"""How the suite's programs are compiled (the pytest process and the subprocesses it starts).

The suite compiles thousands of small programs: compiling, not running, is most of its CPU time.
Measured choices (one process, files run one after the other on the 2-core machine):

* ``--xla_cpu_use_fusion_emitters=false`` (XLA_FLAGS, every CPU process of the suite): XLA:CPU's
  newer fusion emitters cost far more compile time than the elemental emitters they replace.
  tests/core/gptq_test.py with tests/kernels/reference_test.py: 111 s -> 57 s of test time,
  backend compile 81 s -> 29 s over 429 programs; run time unchanged.
* Most optimizations off (jax's ``jax_disable_most_optimizations``: XLA:CPU optimization level 0,
  LLVM's expensive passes off), set through ``NO_OPT_ENV`` so that subprocesses inherit it. On
  the small-program files it saves compile time (the same two files 42 / 37 s -> 28 / 23 s,
  SmolLM2's model tests 67 -> 51 s); on the notebook's real-model steps it costs run time (77 s
  with optimizations -> 119 s without), so the notebook's kernel turns it off. The in-process
  real-model tests keep it: with optimizations on, their three files (SmolLM2, Gemma 3 270M,
  refinement) took 510 s against 485 s without, one full run each.

No fast-math: results may differ in the last bits from a default build (fusion and ordering
differ); every test compares runs compiled alike. The TPU compile tests get none of this (their
figures are the TPU compiler's own, flags as a user has them).
"""

import os

FUSION_EMITTERS_OFF = "--xla_cpu_use_fusion_emitters=false"
NO_OPT_ENV = "JAX_DISABLE_MOST_OPTIMIZATIONS"  # jax's own variable for jax_disable_most_optimizations


def one_device_flags() -> str:
  """This process's XLA_FLAGS without the forced host device count: a subprocess that sees the
  CPU as one device, as a user's does, compiled like the rest of the suite."""
  return " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)

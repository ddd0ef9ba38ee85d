"""A persistent XLA compilation cache shared by the CLIs: a second run does not recompile.

``enable()`` points JAX at ``$GPTQ_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/gptq_jax/xla`` (``~/.cache``
by default), unless ``JAX_COMPILATION_CACHE_DIR`` already names one (then that one is used).
Every executable that took at least ``min_seconds`` to compile is stored. ``--no-compile-cache``
on a CLI skips it.
"""

from __future__ import annotations

import os


def default_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.environ.get("GPTQ_JAX_CACHE_DIR") or os.path.join(base, "gptq_jax", "xla")


def enable(cache_dir: str | None = None, min_seconds: float = 0.2) -> str | None:
  """Turn the cache on; -> its folder (None when it cannot be created: the run goes on without)."""
  import jax

  path = cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_dir()
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
  return path


def add_flag(parser) -> None:
  parser.add_argument("--no-compile-cache", action="store_true",
                      help="do not use the persistent compilation cache (" + default_dir() + ")")

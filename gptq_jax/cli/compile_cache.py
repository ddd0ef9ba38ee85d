"""The persistent XLA compilation cache for the command-line tools (on by default).

Compiled programs are written under ``$GPTQ_JAX_CACHE`` (default ``~/.cache/gptq_jax/jax``) and
reused by the next run with the same program, JAX version and platform, so a second run of a script
skips most of its compilation. ``--no-compile-cache`` turns it off for one run.
"""

from __future__ import annotations

import argparse
import logging
import os

ENV = "GPTQ_JAX_CACHE"
OFF_ENV = "GPTQ_JAX_NO_COMPILE_CACHE"  # "1": never turn the cache on (the test suite sets it for
# its own process, where the CLIs' main() runs in-process beside multi-device programs)
MIN_COMPILE_SECONDS = 0.2  # cache programs that took at least this long to compile

logger = logging.getLogger("gptq_jax")


def default_dir() -> str:
  return os.environ.get(ENV) or os.path.join(os.path.expanduser("~"), ".cache", "gptq_jax", "jax")


def add_flag(parser: argparse.ArgumentParser) -> None:
  """Adds ``--no-compile-cache`` (dest ``compile_cache``, default on)."""
  parser.add_argument("--compile-cache", action=argparse.BooleanOptionalAction, default=True,
                      help=f"reuse compiled programs across runs (stored under ${ENV}, default "
                           "~/.cache/gptq_jax/jax)")


def enable(enabled: bool = True, path: str | None = None,
           min_compile_seconds: float = MIN_COMPILE_SECONDS) -> str | None:
  """Turn the persistent cache on (at ``path`` or ``default_dir()``) for programs that took at
  least ``min_compile_seconds`` to compile; returns the folder, or None when ``enabled`` is False
  or the folder cannot be created (a warning then, never an error)."""
  if not enabled or os.environ.get(OFF_ENV, "") == "1":
    return None
  import jax  # noqa: PLC0415

  path = os.path.abspath(os.path.expanduser(path or default_dir()))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    logger.warning("gptq_jax: compilation cache disabled: cannot create %s (%s)", path, e)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def from_args(args: argparse.Namespace) -> str | None:
  return enable(getattr(args, "compile_cache", True))

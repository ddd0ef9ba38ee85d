"""Helpers shared by the benchmarks and their baselines (stdlib + numpy only: the baseline scripts
run in the GPTQModel venv, which has no JAX).

A benchmark prints a table and, as its last line, one JSON object; `run_json` runs a helper script
in another interpreter and returns that last line parsed.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
BASELINES = os.path.join(BENCH_DIR, "baselines")
GPTQMODEL_PYTHON = os.path.join(REPO, ".venv-gptqmodel", "bin", "python")


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
  """(median, all) wall seconds of `repeats` calls of `fn` (which must block until done)."""
  if repeats < 1:
    raise ValueError(f"repeats={repeats} must be >= 1")
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def peak_rss_mb() -> float:
  """This process's peak resident set size so far, MiB: /proc's VmHWM (the high-water mark of
  this program's memory; `ru_maxrss` is not used where avoidable: Linux carries it across exec, so
  a child started by a big parent would report the parent's peak)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024  # kB
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A plain fixed-width text table; floats get 4 significant digits."""
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
  cells = [list(map(str, headers))] + [[fmt(v) for v in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def emit_json(obj: dict) -> None:
  """The benchmark's last line: one JSON object."""
  sys.stdout.flush()
  print(json.dumps(obj, sort_keys=True), flush=True)


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def gptqmodel_available() -> tuple[bool, str]:
  """(available, why not) for the GPTQModel venv (scripts/setup_gptqmodel.sh builds it)."""
  if not os.path.exists(GPTQMODEL_PYTHON):
    return False, f"{GPTQMODEL_PYTHON} does not exist (run scripts/setup_gptqmodel.sh)"
  r = subprocess.run([GPTQMODEL_PYTHON, "-c", "import gptqmodel, torch"], capture_output=True,
                     text=True, timeout=600)
  if r.returncode != 0:
    return False, "gptqmodel does not import: " + (r.stderr.strip().splitlines() or ["?"])[-1]
  return True, ""


def run_json(python: str, script: str, args: Sequence[str], *, timeout: float | None = None,
             env: dict | None = None) -> dict:
  """Runs `python script args...` (its stderr passes through) and returns its last stdout line,
  parsed as JSON. The child's own stdout (its table) is echoed."""
  cmd = [python, script, *map(str, args)]
  full_env = dict(os.environ, **(env or {}))
  full_env["PYTHONPATH"] = os.pathsep.join([BENCH_DIR, full_env.get("PYTHONPATH", "")]).rstrip(
      os.pathsep)
  r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, env=full_env)
  out = r.stdout.strip().splitlines()
  if r.returncode != 0 or not out:
    raise RuntimeError(f"{' '.join(cmd)} failed with exit code {r.returncode}")
  for line in out[:-1]:
    print("  | " + line)
  return json.loads(out[-1])


def ratio(a: float | None, b: float | None) -> float | None:
  """a / b, or None when either is missing."""
  if a is None or b is None or b == 0:
    return None
  return a / b

"""Per-layer GPTQ solve time: gptq_jax.quantize_weight vs GPTQModel's GPTQ (torch CPU), same run.

    .venv/bin/python benchmarks/bench_solver.py [--shapes small|large|all|576x576,...]
        [--repeats 3] [--baseline-repeats N] [--baseline auto|gptqmodel|numpy|none]

For each (in, out): a fixed synthetic layer (Student-t weights; a full-rank, correlated Hessian
with a heavy-tailed diagonal), 4-bit, group 128, sym, damp 0.1, act_group_aware on (both
libraries' default ordering), block size 128. gptq_jax: the first call (compile + run, with the
XLA compile time measured by jax.monitoring) and the median of `--repeats` calls after it.
The baseline runs in the same run on the same inputs: GPTQModel's `GPTQ.quantize` on torch CPU in a
subprocess of .venv-gptqmodel (W and H exchanged as .npy), or, when that venv is missing, the NumPy
port of the reference (tests/core/reference_gptq.py). Both results are checked against each
other: the share of equal dequantized values and the ratio of the Hessian-weighted error
`tr(D^T H D)`, `D = K - Q` (over at most 256 output columns).
Last line: one JSON object with the figures and the ratios ours / baseline.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (BASELINES, GPTQMODEL_PYTHON, REPO, emit_json, gptqmodel_available, log,  # noqa: E402
                     median_time, ratio, run_json, table)

SMALL = [(576, 576), (576, 1536), (1536, 576)]
LARGE = [(4096, 4096), (4096, 11008), (11008, 4096)]
DAMP = 0.1


def parse_shapes(spec: str) -> list[tuple[int, int]]:
  named = {"small": SMALL, "large": LARGE, "all": SMALL + LARGE}
  if spec in named:
    return named[spec]
  try:
    return [tuple(int(v) for v in s.split("x")) for s in spec.split(",")]  # type: ignore[misc]
  except ValueError:
    raise SystemExit(f"--shapes {spec!r}: expected small, large, all or a list like 576x576,4096x11008")


def make_problem(k: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """kernel [k, n] and H [k, k] = D (A A^T / r + 0.5 I) D, D log-normal: full rank, correlated."""
  rng = np.random.default_rng(seed + k)
  r = 256
  A = rng.standard_normal((k, r), dtype=np.float32)
  d = np.exp(rng.standard_normal(k)).astype(np.float32)
  H = A @ A.T
  H *= 1.0 / r
  H[np.diag_indices(k)] += 0.5
  H *= d[:, None]
  H *= d[None, :]
  kernel = (np.random.default_rng(seed + n).standard_t(4, size=(k, n)) * 0.02).astype(np.float32)
  return kernel, H


def weighted_error(kernel, deq, H, cols: int = 256) -> float:
  D = (np.asarray(kernel, np.float64) - np.asarray(deq, np.float64))[:, :cols]
  return float(np.sum((H.astype(np.float64) @ D) * D))


class CompileClock:
  """Sums JAX's trace / lowering / XLA compile durations reported while it is active."""

  EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
            "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration")

  def __init__(self):
    import jax.monitoring
    self.total, self.active = 0.0, False
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, name, duration, **_):
    if self.active and name in self.EVENTS:
      self.total += duration


def run_ours(shapes, problems, repeats: int) -> dict:
  import jax

  import gptq_jax as gj

  cfg = gj.GPTQConfig(4, group_size=128, sym=True, damp_percent=DAMP, act_group_aware=True,
                      desc_act=False, format="gptq")
  clock = CompileClock()
  out = {}
  for k, n in shapes:
    kernel, H = problems[(k, n)]
    Kj, Hj = jax.device_put(kernel), jax.device_put(H)
    solve = lambda: jax.block_until_ready(gj.quantize_weight(Kj, Hj, cfg))  # noqa: E731
    clock.total, clock.active = 0.0, True
    t0 = time.perf_counter()
    qw = solve()
    first = time.perf_counter() - t0
    clock.active = False
    med, times = median_time(solve, repeats)
    out[(k, n)] = {"solve_s": med, "times_s": times, "first_s": first, "compile_s": clock.total,
                   "deq": np.asarray(qw.dequantize())}
    log(f"gptq_jax {k}x{n}: first {first:.3f}s (compile {clock.total:.3f}s), median {med:.3f}s")
  return out


def run_gptqmodel(shapes, problems, repeats: int, workdir: str) -> tuple[str, dict]:
  for (k, n) in shapes:
    kernel, H = problems[(k, n)]
    np.save(os.path.join(workdir, f"W_{k}x{n}.npy"), kernel)
    np.save(os.path.join(workdir, f"H_{k}.npy"), H)
  spec = ",".join(f"{k}x{n}" for k, n in shapes)
  res = run_json(GPTQMODEL_PYTHON, os.path.join(BASELINES, "gptqmodel_solver.py"),
                 [workdir, "--shapes", spec, "--repeats", repeats, "--damp", DAMP, "--gar", 1])
  out = {}
  for (k, n) in shapes:
    r = res["results"][f"{k}x{n}"]
    out[(k, n)] = dict(r, deq=np.load(os.path.join(workdir, f"Q_{k}x{n}.npy")))
  return res["baseline"], out


def run_numpy_reference(shapes, problems, repeats: int) -> tuple[str, dict]:
  sys.path.insert(0, REPO)
  from tests.core import reference_gptq as ref

  out = {}
  for k, n in shapes:
    kernel, H = problems[(k, n)]
    solve = lambda: ref.fasterquant(kernel, H, bits=4, group_size=128, sym=True,  # noqa: E731
                                    percdamp=DAMP, gar=True)
    t0 = time.perf_counter()
    codes, scale, zero, g_idx, _ = solve()
    first = time.perf_counter() - t0
    med, times = median_time(solve, repeats)
    out[(k, n)] = {"solve_s": med, "times_s": times, "first_s": first,
                   "deq": ref.dequantize(codes, scale, zero, g_idx)}
    log(f"numpy reference {k}x{n}: median {med:.3f}s")
  return "NumPy port of the reference GPTQ (tests/core/reference_gptq.py)", out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shapes", default="all", help="small, large, all, or e.g. 576x576,4096x4096")
  ap.add_argument("--repeats", type=int, default=3, help="timed calls after the first (median)")
  ap.add_argument("--baseline-repeats", type=int, default=None,
                  help="timed baseline calls after its first (default: --repeats); GPTQModel takes "
                       "minutes per 4096-class layer on a loaded 2-core machine")
  ap.add_argument("--baseline", default="auto", choices=("auto", "gptqmodel", "numpy", "none"))
  args = ap.parse_args()
  shapes = parse_shapes(args.shapes)
  base_repeats = args.baseline_repeats or args.repeats

  baseline = args.baseline
  if baseline in ("auto", "gptqmodel"):
    ok, why = gptqmodel_available()
    if not ok:
      if baseline == "gptqmodel":
        raise SystemExit(f"GPTQModel baseline unavailable: {why}")
      log(f"GPTQModel baseline unavailable ({why}); using the NumPy reference instead")
      baseline = "numpy"
    else:
      baseline = "gptqmodel"

  problems = {s: make_problem(*s) for s in shapes}
  base_name, base = "none", {}
  with tempfile.TemporaryDirectory(prefix="bench_solver_") as workdir:
    if baseline == "gptqmodel":  # first, so its subprocess does not compete with our process
      base_name, base = run_gptqmodel(shapes, problems, base_repeats, workdir)
    ours = run_ours(shapes, problems, args.repeats)
  if baseline == "numpy":
    base_name, base = run_numpy_reference(shapes, problems, base_repeats)

  rows, results = [], {}
  for k, n in shapes:
    o, b = ours[(k, n)], base.get((k, n))
    kernel, H = problems[(k, n)]
    entry = {key: o[key] for key in ("solve_s", "times_s", "first_s", "compile_s")}
    if b is not None:
      err_o, err_b = weighted_error(kernel, o["deq"], H), weighted_error(kernel, b["deq"], H)
      entry.update(baseline_solve_s=b["solve_s"], baseline_times_s=b["times_s"],
                   ratio=ratio(o["solve_s"], b["solve_s"]),
                   same_values=float(np.mean(np.isclose(o["deq"], b["deq"], rtol=1e-5,
                                                        atol=1e-8))),
                   error_ratio=ratio(err_o, err_b))
    results[f"{k}x{n}"] = entry
    rows.append((f"{k}x{n}", o["compile_s"], o["first_s"], o["solve_s"],
                 entry.get("baseline_solve_s", "-"), entry.get("ratio", "-"),
                 entry.get("same_values", "-"), entry.get("error_ratio", "-")))
  print(f"GPTQ solve, 4-bit g128 sym, damp {DAMP}, GAR on; baseline: {base_name}")
  print(table(("in x out", "compile s", "first s", "ours s", "base s", "ours/base", "same deq",
               "err ours/base"), rows))
  large = [results[f"{k}x{n}"].get("ratio") for k, n in shapes if k >= 4096 or n >= 4096]
  large = [r for r in large if r is not None]
  emit_json({"bench": "solver", "baseline": base_name, "bits": 4, "group_size": 128, "sym": True,
             "damp_percent": DAMP, "act_group_aware": True, "repeats": args.repeats,
             "baseline_repeats": base_repeats if base else 0,
             "loadavg": os.getloadavg(), "results": results,
             "max_ratio_4096_class": max(large) if large else None})


if __name__ == "__main__":
  main()

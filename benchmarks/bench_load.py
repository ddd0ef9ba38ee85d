"""Loading a packed checkpoint: our orbax checkpoint against its Hugging Face GPTQ export.

    .venv/bin/python benchmarks/bench_load.py [--model smollm2-135m] [--repeats 4]

The model is RTN-quantized (4-bit g128: the load does not depend on how the codes were found),
saved with ``checkpoint.save`` and exported with ``export_hf`` into a temporary folder. Then, in
this process and interleaved (so a shared machine's load falls on all of them alike):
``checkpoint.read`` as it is (orbax given every array's shape and dtype as its restore target),
``checkpoint.read`` without the target (what it did before: orbax opens every array once for its
metadata; the named baseline), and ``interop.import_hf`` of the export. Medians of ``--repeats``;
ratios against the baseline. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit_json, log, median_time, table  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="smollm2-135m")
  p.add_argument("--repeats", type=int, default=4)
  args = p.parse_args()
  import jax  # noqa: PLC0415

  import gptq_jax as gj  # noqa: PLC0415
  from gptq_jax import checkpoint  # noqa: PLC0415
  from gptq_jax.interop import export_hf, import_hf  # noqa: PLC0415
  from gptq_jax.models import load_model  # noqa: PLC0415
  from gptq_jax.pipeline import rtn_model  # noqa: PLC0415

  work = tempfile.mkdtemp(prefix="bench_load_")
  try:
    cfg, params = load_model(args.model)
    qcfg = gj.GPTQConfig(4, group_size=128)
    qparams = rtn_model(params, qcfg)
    ckpt, hf = os.path.join(work, "orbax"), os.path.join(work, "hf")
    checkpoint.save(ckpt, qparams, model_config=cfg, quant_config=qcfg)
    export_hf(hf, qparams, cfg, qcfg)
    del params, qparams
    n_arrays = len(jax.tree.leaves(checkpoint.read(ckpt).meta[checkpoint.SHAPES],
                                   is_leaf=lambda x: isinstance(x, list)))
    cases = {
        "orbax, restore target (ours)": lambda: checkpoint.read(ckpt),
        "orbax, no target (before)": lambda: _without_target(checkpoint, ckpt),
        "HF GPTQ export (import_hf)": lambda: import_hf(hf),
    }
    times = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved
      for name, fn in cases.items():
        times[name].append(median_time(fn, 1)[0])
    med = {name: statistics.median(t) for name, t in times.items()}
    base = med["orbax, no target (before)"]
    rows = [(name, med[name], med[name] / base, " ".join(f"{x:.2f}" for x in times[name]))
            for name in cases]
    print(table(["case", "median s", "x baseline", "runs s"], rows))
    emit_json({"model": args.model, "repeats": args.repeats, "arrays": n_arrays,
               "median_s": med, "ratio_vs_no_target": {k: v / base for k, v in med.items()},
               "loadavg": os.getloadavg()[0]})
  finally:
    shutil.rmtree(work, ignore_errors=True)


def _without_target(checkpoint, path: str):
  with mock.patch.object(checkpoint, "_target", lambda shapes: None):
    return checkpoint.read(path)


if __name__ == "__main__":
  t0 = time.perf_counter()
  main()
  log(f"bench_load: {time.perf_counter() - t0:.0f} s")

"""One process of the multi-host test: ``python worker.py PROCESS_ID NUM_PROCESSES PORT OUT``.

Joins a ``jax.distributed`` job on 127.0.0.1:PORT (2 CPU devices each, gloo collectives), feeds its
share of the calibration samples to ``gptq_jax.quantize`` (uneven with two processes: 10 and 6
samples, so the processes must agree on a common number of micro-batches), and writes
the Hessian each linear was quantized with and the resulting codes to ``OUT.npz`` (only process 0
writes); then the same for a tiny Qwen3-MoE, whose experts' codes and token counts are written
too, to ``OUT_moe.npz`` (one launch for both: process start-up and jax.distributed are paid once).
``NUM_PROCESSES=1`` is the single-process reference on the same data.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if nproc > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid,
                             initialization_timeout=120)

import gptq_jax as gj  # noqa: E402
from gptq_jax.pipeline import driver  # noqa: E402
from tests.distributed.tiny import tiny_setup  # noqa: E402

solve = driver.solve_shared
hessians: dict = {}


def recording_solve(kernels, hessian, cfg_, names, **kw):
  """Test-only spy: keeps the Hessian the driver hands to the solver for each layer (q/k/v and
  gate/up share one solve, so one Hessian serves several names)."""
  for name in names:
    hessians[name] = np.asarray(hessian)
  return solve(kernels, hessian, cfg_, names, **kw)


driver.solve_shared = recording_solve


def run(moe: bool, path: str) -> None:
  hessians.clear()
  cfg, params, samples, qcfg = tiny_setup(moe)
  bounds = {1: (0, 16), 2: (0, 10, 16)}[nproc]
  share = samples[bounds[pid]:bounds[pid + 1]]
  records = []
  qparams = gj.quantize(params, share, qcfg, model_config=cfg, batch_size=2, progress=False,
                        report=records)
  tokens = {f"T:{r['layer']}": r["tokens"] for r in records if "tokens" in r}
  codes = {}
  for i in range(cfg.num_hidden_layers):
    for group, sub in qparams[f"layers_{i}"].items():
      for proj, leaf in sub.items():
        if isinstance(leaf, dict) and hasattr(leaf.get("kernel"), "unpack"):
          codes[f"layers.{i}.{group}.{proj}"] = np.asarray(leaf["kernel"].unpack().codes)
        elif proj == "experts":  # stacked: [E, in, out] codes
          for name, w in leaf.items():
            codes[f"layers.{i}.{group}.experts.{name}"] = np.asarray(w["kernel"].unpack().codes)
  if pid == 0:
    np.savez(path, devices=jax.device_count(), processes=jax.process_count(),
             **{f"H:{k}": v for k, v in hessians.items()},
             **{f"Q:{k}": v for k, v in codes.items()}, **tokens)
  print(f"process {pid}/{nproc}{' moe' if moe else ''}: {jax.device_count()} devices, "
        f"{len(hessians)} layers", flush=True)


run(False, out)
run(True, out[:-len(".npz")] + "_moe.npz")

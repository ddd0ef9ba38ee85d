"""GPTQModel's one-layer GPTQ solve on torch CPU (run with .venv-gptqmodel's python).

    gptqmodel_solver.py WORKDIR --shapes 576x576,4096x4096 --repeats 3 --damp 0.1 --gar 1

Reads `WORKDIR/W_{in}x{out}.npy` (Flax layout `[in, out]`) and `WORKDIR/H_{in}.npy` (`[in, in]`),
runs `gptqmodel.quantization.gptq.GPTQ.quantize` (4-bit, group 128, sym, blocksize 128, mse 0, the
given damping and act_group_aware, desc_act off) on an `nn.Linear` holding `W.T` with `H` set as its
finalized Hessian, `1 + repeats` times (the first is a warm-up), writes the dequantized result to
`WORKDIR/Q_{in}x{out}.npy` (`[in, out]`) and prints one JSON line with the times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

from _common import emit_json, log, table


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("workdir")
  ap.add_argument("--shapes", required=True)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--damp", type=float, default=0.1)
  ap.add_argument("--gar", type=int, default=1)
  ap.add_argument("--desc-act", type=int, default=0)
  args = ap.parse_args()

  import gptqmodel
  from gptqmodel.quantization.config import GPTQConfig as GPTQModelConfig
  from gptqmodel.quantization.gptq import GPTQ

  qcfg = GPTQModelConfig(bits=4, group_size=128, sym=True, desc_act=bool(args.desc_act),
                         act_group_aware=bool(args.gar) and not args.desc_act,
                         damp_percent=args.damp, damp_auto_increment=0.01, mse=0.0,
                         offload_to_disk=False)

  def solve(W, H):
    """Only `GPTQ.quantize` is timed: the layer, task and H copy are made before."""
    k, n = W.shape
    layer = torch.nn.Linear(k, n, bias=False)
    layer.weight.data = torch.from_numpy(np.ascontiguousarray(W.T)).clone()
    g = GPTQ(layer, qcfg=qcfg)
    g.quantizer.configure(perchannel=True)  # as GPTQModel's GPTQProcessor does
    g.H = torch.from_numpy(H).clone()  # a finalized Hessian: no pending partials to merge
    g.nsamples = 1
    t0 = time.perf_counter()
    Q = g.quantize(blocksize=128)[0]
    return Q, time.perf_counter() - t0

  results, rows = {}, []
  for spec in args.shapes.split(","):
    k, n = map(int, spec.split("x"))
    W = np.load(os.path.join(args.workdir, f"W_{k}x{n}.npy"))
    H = np.load(os.path.join(args.workdir, f"H_{k}.npy"))
    Q, first = solve(W, H)
    times = [solve(W, H)[1] for _ in range(args.repeats)]
    med = statistics.median(times)
    np.save(os.path.join(args.workdir, f"Q_{k}x{n}.npy"), Q.numpy().T.astype(np.float32))
    results[spec] = {"solve_s": med, "times_s": times, "first_s": first}
    rows.append((spec, first, med))
    log(f"gptqmodel {spec}: first {first:.3f}s median {med:.3f}s")
  print(table(("shape", "first s", "median s"), rows))
  emit_json({"baseline": f"GPTQModel {gptqmodel.__version__} (torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads)", "results": results})


if __name__ == "__main__":
  sys.exit(main())

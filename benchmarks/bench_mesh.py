"""Data-parallel refinement and multi-process GPTAQ, against one device / one process in the same run.

1. **Refinement on 4 local devices vs 1** (``gptq_jax.quantize`` with ``refine_steps``, the first
   ``--blocks`` blocks of SmolLM2-135M, ``--nsamples`` x ``--seqlen`` SOTU windows): each device
   count runs in its own interpreter (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set
   before JAX starts); the figure is the wall time of the ``quantize`` call (compilation included)
   and of the refinement alone (the report's ``refine_seconds``), with each block's held-out error
   after refinement (the runs differ only by their minibatches).
2. **GPTAQ through the CLI on 2 processes vs 1** (``scripts/quantize_llama.py --gptaq`` on the
   whole SmolLM2-135M, 4-bit g128, ``.npy`` calibration tokens, no evaluation): wall time of each
   run (both processes on loopback, started together; the slower one counts), and whether the
   two checkpoints' codes agree.

On this 2-core CPU, 4 "devices" and 2 processes share the same two cores: the ratios say what the
data-parallel code costs or saves where there is nothing to gain from more hardware, not what a
TPU slice gains. Run it alone under the heavy-job lock:
``flock /tmp/gptq_heavy.lock .venv/bin/python benchmarks/bench_mesh.py``. The last line is one
JSON object (ratios: the multi-device or multi-process time over the one-device / one-process
time; below 1 is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import REPO, emit_json, log, table  # noqa: E402


def _refine_worker(args) -> None:
  """One device count (this interpreter's): quantize the first blocks with refinement."""
  import jax  # noqa: PLC0415

  import gptq_jax as gj  # noqa: PLC0415
  from gptq_jax import data  # noqa: PLC0415
  from gptq_jax.models import load_model, load_tokenizer  # noqa: PLC0415
  from gptq_jax.pipeline import quantize  # noqa: PLC0415
  from gptq_jax.pipeline.adapter import ModelAdapter  # noqa: PLC0415

  class FirstBlocks(ModelAdapter):
    def num_blocks(self, params):
      return args.blocks

  model_config, params = load_model("smollm2-135m")
  calib = data.text_calib_batches(data.sotu_texts("calib"), load_tokenizer("smollm2-135m"),
                                  nsamples=args.nsamples, seqlen=args.seqlen)
  cfg = gj.GPTQConfig(4, group_size=128, refine_steps=args.refine_steps, refine_seqlen=0,
                      refine_batch=args.refine_batch)
  n = jax.device_count()
  report: list[dict] = []
  t0 = time.perf_counter()
  quantize(params, calib, cfg, adapter=FirstBlocks(model_config), mesh="auto" if n > 1 else None,
           batch_size=max(n, 4), progress=False, report=report)
  seconds = time.perf_counter() - t0
  blocks = {r["block"]: r for r in report if "refine_seconds" in r}
  print(json.dumps({"devices": n, "seconds": seconds,
                    "refine_seconds": sum(r["refine_seconds"] for r in blocks.values()),
                    "mse_after": [blocks[i]["refine_block_mse_after"] for i in sorted(blocks)]}))


def _run_refine(devices: int, args) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  cmd = [sys.executable, os.path.abspath(__file__), "--refine-worker", "--blocks",
         str(args.blocks), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
         "--refine-steps", str(args.refine_steps), "--refine-batch", str(args.refine_batch)]
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=7200)
  if r.returncode != 0:
    raise RuntimeError(f"refinement on {devices} device(s) failed:\n{r.stderr[-3000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_cli(nproc: int, tokens: str, out: str, args) -> float:
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  cmd = [sys.executable, os.path.join(REPO, "scripts", "quantize_llama.py"), "--model",
         "smollm2-135m", "--output", out, "--bits", "4", "--group-size", "128", "--gptaq",
         "--dataset", tokens, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
         "--eval-text", "none", "--sample-prompt", "", "--no-progress"]
  port = _free_port()
  extra = ([[]] if nproc == 1 else
           [["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(nproc),
             "--process-id", str(p)] for p in range(nproc)])
  t0 = time.perf_counter()
  procs = [subprocess.Popen(cmd + e, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for e in extra]
  logs = [p.communicate(timeout=7200)[0] for p in procs]
  seconds = time.perf_counter() - t0
  for p, text in zip(procs, logs):
    if p.returncode != 0:
      raise RuntimeError(f"the {nproc}-process CLI run failed:\n{text[-3000:]}")
  return seconds


def _same_codes(a: str, b: str) -> float:
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from gptq_jax import PackedWeight, checkpoint  # noqa: PLC0415

  packed = lambda x: isinstance(x, PackedWeight)  # noqa: E731
  la = jax.tree.leaves(checkpoint.load(a).params, is_leaf=packed)
  lb = jax.tree.leaves(checkpoint.load(b).params, is_leaf=packed)
  same, total = 0, 0
  for x, y in zip(la, lb, strict=True):  # same tree: a norm's scale sits beside the kernels
    if packed(x):
      cx, cy = np.asarray(x.unpack().codes), np.asarray(y.unpack().codes)
      same, total = same + int((cx == cy).sum()), total + cx.size
  return same / total


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--blocks", type=int, default=4, help="refinement: SmolLM2 blocks quantized")
  p.add_argument("--nsamples", type=int, default=16)
  p.add_argument("--seqlen", type=int, default=128)
  p.add_argument("--refine-steps", type=int, default=32)
  p.add_argument("--refine-batch", type=int, default=4)
  p.add_argument("--skip", choices=("refine", "gptaq"), action="append", default=[])
  p.add_argument("--refine-worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.refine_worker:
    _refine_worker(args)
    return
  result: dict = {}
  rows = []
  if "refine" not in args.skip:
    one, four = _run_refine(1, args), _run_refine(4, args)
    result["refine"] = {"one_device": one, "four_devices": four,
                        "ratio_quantize": four["seconds"] / one["seconds"],
                        "ratio_refinement": four["refine_seconds"] / one["refine_seconds"]}
    rows += [["refinement, quantize()", "1 device", one["seconds"], four["seconds"],
              four["seconds"] / one["seconds"]],
             ["refinement alone", "1 device", one["refine_seconds"], four["refine_seconds"],
              four["refine_seconds"] / one["refine_seconds"]]]
    log(f"held-out block MSE after refinement, 1 device: {one['mse_after']}")
    log(f"held-out block MSE after refinement, 4 devices: {four['mse_after']}")
  if "gptaq" not in args.skip:
    import numpy as np  # noqa: PLC0415

    from gptq_jax import data  # noqa: PLC0415
    from gptq_jax.models import load_tokenizer  # noqa: PLC0415

    work = tempfile.mkdtemp(prefix="bench_mesh_")
    calib = data.text_calib_batches(data.sotu_texts("calib"), load_tokenizer("smollm2-135m"),
                                    nsamples=args.nsamples, seqlen=args.seqlen)
    tokens = os.path.join(work, "tokens.npy")
    try:
      np.save(tokens, np.concatenate([b["input_ids"] for b in calib]))
      one = _run_cli(1, tokens, os.path.join(work, "one"), args)
      two = _run_cli(2, tokens, os.path.join(work, "two"), args)
      same = _same_codes(os.path.join(work, "one"), os.path.join(work, "two"))
    finally:  # the two checkpoints and the tokens (about 200 MB): nothing left behind
      shutil.rmtree(work, ignore_errors=True)
    result["gptaq"] = {"one_process_s": one, "two_processes_s": two, "ratio": two / one,
                       "codes_equal": same}
    rows.append(["GPTAQ CLI, SmolLM2 (30 blocks)", "1 process", one, two, two / one])
    log(f"GPTAQ codes equal between 1 and 2 processes: {same:.6f}")
  print(table(["what", "baseline", "baseline s", "ours s", "ratio"], rows))
  result["loadavg"] = os.getloadavg()
  emit_json(result)


if __name__ == "__main__":
  main()

"""Quality ladder on SmolLM2-135M, 4-bit group 128 sym: float, RTN, GPTQ, + act-order, + clipping
search (the references' objective, then Hessian-weighted), + optax refinement — and GPTQModel's
GPTQ + act-order + clipping search — in one run.

    .venv/bin/python benchmarks/bench_quality.py [--nsamples 32] [--seqlen 512]
        [--eval-windows 40] [--refine-steps 40] [--refine-lr 5e-3] [--refine-batch 2]
        [--no-baseline]

Calibration and evaluation tokens are made by ``bench_pipeline.prepare`` (shared with the pipeline
benchmark): ``--nsamples`` random ``--seqlen`` windows of the State of the Union addresses
1990-2015 (seed 0) saved as one token array both libraries use as is; perplexity on the first
``--eval-windows`` non-overlapping windows of the held-out addresses 2016-2021. Every gptq_jax case
runs in this process, timed alone (compilation included); "GPTQ" is the library default order
(group-aware reordering, GAR), "+ act-order" is desc_act. "+mse" is the clipping search with
norm 2.4 and the references' objective ``sum |q - x|^2.4`` (``mse_weight="none"``: the same
algorithm as GPTQModel's, code for code on the same Hessian); "+mse_h" weighs each column's error
by the inverse-Hessian factor's diagonal (``mse_weight="hessian"``); refinement runs on top of
"+mse_h". GPTQModel runs in its own venv through
``baselines/gptqmodel_pipeline.py`` with its config's ``mse`` set to the same 2.4 (a wrapper sets
it: that script's config is otherwise ours without clipping), desc_act on.
Last line: one JSON object with perplexities, increases over float, and wall times.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (BASELINES, GPTQMODEL_PYTHON, emit_json, gptqmodel_available, log,  # noqa: E402
                     run_json, table)

MODEL = "smollm2-135m"
MSE = 2.4


def gptqmodel_with_mse(mse: float, argv: list[str]) -> None:
  """Runs in the GPTQModel venv: the shared baseline script with its config's ``mse`` set."""
  import gptqmodel.quantization.config as gconf

  post_init = gconf.GPTQConfig.__post_init__

  def with_mse(self):  # every GPTQConfig built in this process (reloads too: harmless) clips
    self.mse = mse
    post_init(self)

  gconf.GPTQConfig.__post_init__ = with_mse
  script = os.path.join(BASELINES, "gptqmodel_pipeline.py")
  sys.argv = [script, *argv]
  runpy.run_path(script, run_name="__main__")


def ours(workdir: str, args) -> dict:
  """Every gptq_jax case: {name: {"ppl", "seconds"}} plus the refinement records."""
  import gptq_jax as gj
  from gptq_jax.eval import perplexity
  from gptq_jax.models import load_llama
  from gptq_jax.pipeline import dense_block, quantize, rtn_model

  calib = np.load(os.path.join(workdir, "calib.npy"))
  tokens = np.load(os.path.join(workdir, "eval.npy"))
  cfg, params = load_llama(MODEL)
  ppl = lambda p: perplexity(p, cfg, tokens, seqlen=args.seqlen, batch_size=4)  # noqa: E731
  base = gj.GPTQConfig(4, group_size=128, sym=True, damp_percent=0.1, seed=0)
  act = dict(desc_act=True, act_group_aware=False)
  cases = {
      "gptq": base,
      "gptq+act": base.replace(**act),
      "gptq+act+mse": base.replace(**act, mse=MSE),
      "gptq+act+mse_h": base.replace(**act, mse=MSE, mse_weight="hessian"),
      "gptq+act+mse_h+refine": base.replace(**act, mse=MSE, mse_weight="hessian",
                                            refine_steps=args.refine_steps,
                                            refine_lr=args.refine_lr,
                                            refine_batch=args.refine_batch),
  }
  out = {"float": {"ppl": ppl(params), "seconds": 0.0}}
  log(f"float: ppl {out['float']['ppl']:.4f}")

  t0 = time.perf_counter()
  rtn = rtn_model(params, base, model_config=cfg)
  rtn_s = time.perf_counter() - t0
  out["rtn"] = {"ppl": ppl(dense_block(rtn)), "seconds": rtn_s}
  log(f"rtn: ppl {out['rtn']['ppl']:.4f} ({rtn_s:.1f}s)")

  for name, qcfg in cases.items():
    report: list[dict] = []
    t0 = time.perf_counter()
    q = quantize(params, calib, qcfg, model_config=cfg, mesh=None, progress=False,
                 batch_size=args.batch_size, report=report)
    seconds = time.perf_counter() - t0
    out[name] = {"ppl": ppl(dense_block(q)), "seconds": seconds}
    if qcfg.refine_steps:
      blocks = {r["block"]: r for r in report}
      out[name]["block_mse_ratio"] = [
          blocks[i]["refine_block_mse_after"] / blocks[i]["refine_block_mse_before"]
          for i in sorted(blocks)]
    log(f"{name}: ppl {out[name]['ppl']:.4f} ({seconds:.1f}s)")
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--nsamples", type=int, default=32)
  ap.add_argument("--seqlen", type=int, default=512)
  ap.add_argument("--eval-windows", type=int, default=40)
  ap.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward")
  ap.add_argument("--refine-steps", type=int, default=40)
  ap.add_argument("--refine-lr", type=float, default=5e-3)
  ap.add_argument("--refine-batch", type=int, default=2)
  ap.add_argument("--no-baseline", action="store_true")
  if sys.argv[1:3] == ["--side", "gptqmodel"]:  # the child in the GPTQModel venv
    return gptqmodel_with_mse(MSE, sys.argv[3:])
  args = ap.parse_args()

  from bench_pipeline import prepare  # the shared calibration / evaluation / HF-folder recipe

  if not args.no_baseline:
    ok, why = gptqmodel_available()
    if not ok:
      log(f"GPTQModel baseline unavailable ({why}): gptq_jax figures only")
      args.no_baseline = True
  with tempfile.TemporaryDirectory(prefix="bench_quality_") as workdir:
    prepare(workdir, args)
    n_eval = np.load(os.path.join(workdir, "eval.npy")).shape[0] // args.seqlen
    res = ours(workdir, args)
    if not args.no_baseline:
      log("GPTQModel: act-order + clipping search ...")
      b = run_json(GPTQMODEL_PYTHON, os.path.abspath(__file__), [
          "--side", "gptqmodel", os.path.join(workdir, "hf"), os.path.join(workdir, "calib.npy"),
          os.path.join(workdir, "eval.npy"), os.path.join(workdir, "gptqmodel_out"), "--seqlen",
          args.seqlen, "--desc-act", 1, "--damp", 0.1, "--batch-size", args.batch_size],
          env={"TORCH_COMPILE_DISABLE": "1", "GPTQMODEL_CPU_WORKERS": "2",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "XLA_FLAGS": ""})
      res["gptqmodel+act+mse"] = {"ppl": b["ppl_gptq"], "seconds": b["quantize_s"],
                                  "ppl_float_torch": b.get("ppl_float")}
  f = res["float"]["ppl"]
  for r in res.values():
    r["increase"] = r["ppl"] / f - 1
  print(f"SmolLM2-135M, 4-bit g128 sym, {args.nsamples} x {args.seqlen} calibration tokens "
        f"(SOTU 1990-2015); perplexity on {n_eval} x {args.seqlen} held-out tokens (2016-2021)")
  print(table(("case", "ppl", "vs float", "seconds"),
              [(k, r["ppl"], f"{r['increase']:+.2%}", r["seconds"]) for k, r in res.items()]))
  best = min((k for k in res if k != "float"), key=lambda k: res[k]["ppl"])
  summary = {"best": best, "best_within_25pct_of_float": res[best]["increase"] <= 0.25}
  if "gptqmodel+act+mse" in res:
    theirs = res["gptqmodel+act+mse"]["ppl"]
    summary["act_mse_at_least_as_good_as_gptqmodel"] = res["gptq+act+mse_h"]["ppl"] <= theirs
    summary["ppl_ratio_vs_gptqmodel"] = {k: res[k]["ppl"] / theirs
                                         for k in ("gptq+act+mse", "gptq+act+mse_h")}
  print(summary)
  emit_json({"bench": "quality", "model": MODEL, "nsamples": args.nsamples,
             "seqlen": args.seqlen, "eval_windows": n_eval, "bits": 4, "group_size": 128,
             "sym": True, "mse": MSE, "refine_steps": args.refine_steps,
             "refine_lr": args.refine_lr, "refine_batch": args.refine_batch,
             "loadavg": os.getloadavg(), "results": res, **summary})


if __name__ == "__main__":
  main()

"""Quality by distributions: each configuration of gptq_jax and of GPTQModel 7.7 over several
calibration draws of the same size, with the mean and spread of the perplexity on held-out text.

    .venv/bin/python benchmarks/bench_quality.py [--model smollm2-135m|gemma3-270m] [--bits 4,3]
        [--draws 5] [--nsamples 32] [--seqlen 512] [--eval-windows 40]
        [--ours gar,act+mse_h,gptaq,rot,rot+gptaq,...] [--theirs nat,act+mse,gptaq,rot]
        [--refine-steps 32] [--no-baseline]

A case is a ``+``-joined list of settings on top of 4/3-bit, group 128, sym, damp 0.1:
``nat`` natural column order (no GAR; GAR is the default of both libraries without act-order),
``act`` act-order (desc_act), ``mse`` the clipping search with norm 2.4 (the references'
objective), ``mse_h`` the same search Hessian-weighted (ours only), ``gptaq`` GPTAQ with alpha 0.25,
``rot`` a Hadamard rotation of the residual stream (ours: folded into the weights,
``pipeline/rotation.py``; refused for Gemma 3, whose post-norms on the block outputs do not commute
with a rotation; GPTQModel: its own rotation, Llama/Qwen2 only, which calls ``.cuda()`` in
GPTQModel 7.7 and therefore fails on a CPU-only machine), ``refine`` optax refinement (ours only,
``--refine-steps``, the other refinement settings at their defaults). A row that cannot run is
left out of the table and listed under it with the reason. GPTQModel's GPTAQ ignores
GAR (its GPTAQ column loop has no reordering), so its ``gptaq`` row is natural order: compare it
with our ``nat+gptaq``.

Draw ``d`` takes ``--nsamples`` random ``--seqlen`` windows of the State of the Union addresses
1990-2015 with seed ``d``, saved as one token array that both libraries use as is; perplexity is
measured on the first ``--eval-windows`` non-overlapping windows of the addresses 2016-2021 (for
Gemma, whose tokenizer asks for it, every window starts with ``<bos>``, on both sides).
Ours run in this process (the model is loaded once), each GPTQModel case and draw in its own
process of the GPTQModel venv. Per row: perplexity mean, sample standard deviation and range over
the draws, the mean increase over float, and the mean quantization wall time. The summary line
holds the issue's bars where both sides ran: the 3-bit natural-order increase ratio, the best
setting of each side, and ``refine_time_ratio`` (our fastest refined case's quantize time over
GPTQModel's act-order + mse, both measured in this run).
Last line: one JSON object with every draw's figures.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (BASELINES, GPTQMODEL_PYTHON, emit_json, gptqmodel_available, log,  # noqa: E402
                     run_json, table)

MSE = 2.4
OURS_TOKENS = ("nat", "gar", "act", "mse", "mse_h", "gptaq", "rot", "refine")
THEIRS_TOKENS = ("nat", "gar", "act", "mse", "gptaq", "rot")


def _tokens(case: str, allowed) -> set[str]:
  toks = set(case.split("+"))
  bad = toks - set(allowed)
  if bad:
    raise SystemExit(f"case {case!r}: unknown setting(s) {sorted(bad)}; allowed: {allowed}")
  return toks


def our_config(case: str, bits: int, refine_steps: int):
  import gptq_jax as gj

  t = _tokens(case, OURS_TOKENS)
  return gj.GPTQConfig(
      bits, group_size=128, sym=True, damp_percent=0.1, desc_act="act" in t,
      act_group_aware=not ({"act", "nat"} & t), mse=MSE if {"mse", "mse_h"} & t else 0.0,
      mse_weight="hessian" if "mse_h" in t else "none", gptaq="gptaq" in t,
      rotation="hadamard" if "rot" in t else "none",
      refine_steps=refine_steps if "refine" in t else 0)


# --- the GPTQModel side (runs in .venv-gptqmodel: no JAX) ----------------------------------------
def gptqmodel_case(argv: list[str]) -> None:
  ap = argparse.ArgumentParser()
  for name in ("src", "calib", "eval", "out", "case"):
    ap.add_argument(name)
  ap.add_argument("--bits", type=int, required=True)
  ap.add_argument("--seqlen", type=int, required=True)
  ap.add_argument("--batch-size", type=int, default=8)
  args = ap.parse_args(argv)
  import torch
  from gptqmodel import BACKEND, GPTQModel
  from gptqmodel.quantization.config import GPTAQConfig, GPTQConfig

  sys.path.insert(0, BASELINES)
  from gptqmodel_pipeline import perplexity

  t = _tokens(args.case, THEIRS_TOKENS)
  qcfg = GPTQConfig(bits=args.bits, group_size=128, sym=True, desc_act="act" in t,
                    act_group_aware=not ({"act", "nat"} & t), damp_percent=0.1,
                    damp_auto_increment=0.01, mse=MSE if "mse" in t else 0.0,
                    static_groups=False, true_sequential=True, format="gptq",
                    offload_to_disk=False, gptaq=GPTAQConfig(alpha=0.25) if "gptaq" in t else None,
                    rotation="hadamard" if "rot" in t else None)
  model = GPTQModel.load(args.src, qcfg, device="cpu", dtype=torch.float32)
  calib = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)}
           for row in np.load(args.calib)]
  t0 = time.perf_counter()
  model.quantize(calib, batch_size=args.batch_size)
  seconds = time.perf_counter() - t0
  model.save(args.out)
  del model
  reloaded = GPTQModel.load(args.out, device="cpu", backend=BACKEND.GPTQ_TORCH,
                            dtype=torch.float16)
  reloaded.model.float()
  emit_json({"ppl": perplexity(reloaded.model, np.load(args.eval), args.seqlen),
             "seconds": seconds})


# --- our side ----------------------------------------------------------------------------------
def prepare(workdir: str, args) -> tuple[list[str], str]:
  """calib_<d>.npy per draw, eval.npy, and (for GPTQModel) the float HF folder."""
  from gptq_jax import data
  from gptq_jax.models import load_llama, load_tokenizer, save_hf_folder

  tok = load_tokenizer(args.model)
  texts = data.sotu_texts("calib")
  calibs = []
  bos = data.bos_token_id(tok)
  for d in range(args.draws):
    batches = data.text_calib_batches(texts, tok, nsamples=args.nsamples, seqlen=args.seqlen,
                                      seed=d, batch_size=args.nsamples)
    path = os.path.join(workdir, f"calib_{d}.npy")
    np.save(path, np.concatenate([b["input_ids"] for b in batches]))
    calibs.append(path)
  tokens = data.tokenize_text(data.sotu_texts("eval"), tok)
  text = args.seqlen - (bos is not None)  # text tokens per window
  tokens = tokens[1:] if bos is not None and tokens[0] == bos else tokens
  n = min(args.eval_windows, tokens.shape[0] // text)
  windows = tokens[: n * text].reshape(n, text)
  if bos is not None:
    windows = np.concatenate([np.full((n, 1), bos, windows.dtype), windows], axis=1)
  eval_path = os.path.join(workdir, "eval.npy")
  np.save(eval_path, windows)  # [n, seqlen]
  args.bos = bos
  if not args.no_baseline:
    cfg, params = load_llama(args.model)
    save_hf_folder(os.path.join(workdir, "hf"), cfg, params)
    tok.save_pretrained(os.path.join(workdir, "hf"))
  return calibs, eval_path


def run_ours(calibs, eval_path, args) -> dict:
  from gptq_jax.eval import perplexity
  from gptq_jax.models import load_llama
  from gptq_jax.pipeline import dense_block, quantize
  from gptq_jax.pipeline.rotation import rotate_model

  windows = np.load(eval_path)  # [n, seqlen], <bos> first when args.bos
  tokens = (windows[:, 1:] if args.bos is not None else windows).reshape(-1)
  cfg, params = load_llama(args.model)
  rotated = None
  eval_batch = 4 if cfg.vocab_size <= 65536 else 1  # Gemma's 262k-way logits: 0.5 GB per window
  ppl = lambda c, p: perplexity(p, c, tokens, seqlen=args.seqlen,  # noqa: E731
                                batch_size=eval_batch, bos_token_id=args.bos)
  out = {"float": [{"ppl": ppl(cfg, params), "seconds": 0.0}]}
  log(f"float: ppl {out['float'][0]['ppl']:.4f}")
  for bits in args.bits:
    for case in args.ours:
      qcfg = our_config(case, bits, args.refine_steps)
      mcfg, mparams = cfg, params
      if qcfg.rotation != "none":
        if rotated is None:
          t0 = time.perf_counter()
          try:
            rotated = rotate_model(cfg, params, "hadamard", seed=0) + (time.perf_counter() - t0,)
          except ValueError as e:  # Gemma 3: its post-norms do not commute with a rotation
            rotated = str(e)
        if isinstance(rotated, str):
          args.notes.append(f"{bits}/ours/{case}: refused by gptq_jax ({rotated.split(':')[0]}: "
                            "post-norms on the block outputs)")
          log(f"ours {bits}-bit {case}: {rotated}")
          continue
        mcfg, mparams, rot_s = rotated
      runs = []
      for d, calib in enumerate(calibs):
        t0 = time.perf_counter()
        q = quantize(mparams, np.load(calib), qcfg, model_config=mcfg, mesh=None, progress=False,
                     batch_size=args.batch_size)
        seconds = time.perf_counter() - t0 + (rot_s if qcfg.rotation != "none" else 0.0)
        runs.append({"ppl": ppl(mcfg, dense_block(q)), "seconds": seconds})
        log(f"ours {bits}-bit {case} draw {d}: ppl {runs[-1]['ppl']:.4f} ({seconds:.1f}s)")
      out[f"{bits}/ours/{case}"] = runs
  return out


def run_theirs(workdir, calibs, eval_path, args) -> dict:
  out = {}
  for bits in args.bits:
    for case in args.theirs:
      runs = []
      for d, calib in enumerate(calibs):
        try:
          r = run_json(GPTQMODEL_PYTHON, os.path.abspath(__file__), [
              "--side", "gptqmodel", os.path.join(workdir, "hf"), calib, eval_path,
              os.path.join(workdir, f"gptqmodel_{bits}_{case}_{d}"), case, "--bits", bits,
              "--seqlen", args.seqlen, "--batch-size", args.batch_size],
              env={"TORCH_COMPILE_DISABLE": "1", "GPTQMODEL_CPU_WORKERS": "2",
                   "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "XLA_FLAGS": ""})
        except RuntimeError as e:  # e.g. a rotation GPTQModel does not support for this model
          log(f"GPTQModel {bits}-bit {case} draw {d} failed: {e}")
          why = ("GPTQModel 7.7's rotation: Llama/Qwen2 only, and it calls .cuda(): needs CUDA"
                 if "rot" in case
                 else str(e).strip().splitlines()[-1][:120])
          args.notes.append(f"{bits}/gptqmodel/{case}: failed ({why})")
          break
        runs.append(r)
        log(f"GPTQModel {bits}-bit {case} draw {d}: ppl {r['ppl']:.4f} ({r['seconds']:.1f}s)")
      if runs:
        out[f"{bits}/gptqmodel/{case}"] = runs
  return out


def summarize(res: dict) -> dict:
  f = res["float"][0]["ppl"]
  rows = {}
  for key, runs in res.items():
    p = [r["ppl"] for r in runs]
    inc = [x / f - 1 for x in p]
    rows[key] = {"ppl_mean": statistics.fmean(p), "ppl_std": statistics.stdev(p) if len(p) > 1
                 else 0.0, "ppl_min": min(p), "ppl_max": max(p),
                 "increase_mean": statistics.fmean(inc),
                 "increase_std": statistics.stdev(inc) if len(inc) > 1 else 0.0,
                 "seconds_mean": statistics.fmean(r["seconds"] for r in runs), "draws": len(p)}
  return rows


def checks(rows: dict, bits_list) -> dict:
  """The issue's bars, where both sides' rows exist."""
  out = {}
  for bits in bits_list:
    ours = {k: v for k, v in rows.items() if k.startswith(f"{bits}/ours/")}
    theirs = {k: v for k, v in rows.items() if k.startswith(f"{bits}/gptqmodel/")}
    if not ours:
      continue
    best = min(ours, key=lambda k: ours[k]["increase_mean"])
    out[f"{bits}bit_best_ours"] = best
    out[f"{bits}bit_best_ours_vs_float"] = 1 + ours[best]["increase_mean"]
    if theirs:
      tbest = min(theirs, key=lambda k: theirs[k]["increase_mean"])
      out[f"{bits}bit_best_gptqmodel"] = tbest
      out[f"{bits}bit_best_increase_ratio"] = (ours[best]["increase_mean"]
                                               / theirs[tbest]["increase_mean"])
    refined = [k for k in ours if "refine" in k.split("/")[2].split("+")]
    base = rows.get(f"{bits}/gptqmodel/act+mse")
    if refined and base:  # the time bar: a refined whole run against act-order + mse
      fastest = min(refined, key=lambda k: ours[k]["seconds_mean"])
      out[f"{bits}bit_refine_time_ratio"] = ours[fastest]["seconds_mean"] / base["seconds_mean"]
      out[f"{bits}bit_refine_time_case"] = fastest
    for case in ("nat", "gar"):
      a, b = rows.get(f"{bits}/ours/{case}"), rows.get(f"{bits}/gptqmodel/{case}")
      if a and b:
        out[f"{bits}bit_{case}_increase_ratio"] = a["increase_mean"] / b["increase_mean"]
        out[f"{bits}bit_{case}_within_gptqmodel_plus_2pct"] = (
            a["increase_mean"] <= b["increase_mean"] * 1.02)
        spread = math.hypot(a["increase_std"], b["increase_std"])
        out[f"{bits}bit_{case}_difference_in_spreads"] = (
            (a["increase_mean"] - b["increase_mean"]) / spread if spread else None)
  return out


def main() -> None:
  if sys.argv[1:3] == ["--side", "gptqmodel"]:  # the child in the GPTQModel venv
    return gptqmodel_case(sys.argv[3:])
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="smollm2-135m")
  ap.add_argument("--bits", default="4,3")
  ap.add_argument("--draws", type=int, default=5)
  ap.add_argument("--nsamples", type=int, default=32)
  ap.add_argument("--seqlen", type=int, default=512)
  ap.add_argument("--eval-windows", type=int, default=40)
  ap.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward")
  ap.add_argument("--ours", default="nat,gar,act+mse_h,act+mse_h+refine,nat+gptaq,gptaq,"
                  "act+mse_h+gptaq,rot,rot+gptaq,rot+act+mse_h+gptaq,rot+act+mse_h+refine,"
                  "rot+act+mse_h+gptaq+refine")
  ap.add_argument("--theirs", default="nat,gar,act+mse,gptaq")
  ap.add_argument("--refine-steps", type=int, default=32)
  ap.add_argument("--no-baseline", action="store_true")
  args = ap.parse_args()
  args.bits = [int(b) for b in args.bits.split(",")]
  args.ours = [c for c in args.ours.split(",") if c]
  args.theirs = [c for c in args.theirs.split(",") if c]
  args.notes = []
  for c in args.ours:
    _tokens(c, OURS_TOKENS)
  for c in args.theirs:
    _tokens(c, THEIRS_TOKENS)
  if not args.no_baseline and args.theirs:
    ok, why = gptqmodel_available()
    if not ok:
      log(f"GPTQModel baseline unavailable ({why}): gptq_jax figures only")
      args.no_baseline = True
  with tempfile.TemporaryDirectory(prefix="bench_quality_") as workdir:
    calibs, eval_path = prepare(workdir, args)
    n_eval = np.load(eval_path).shape[0]  # [windows, seqlen]
    res = run_ours(calibs, eval_path, args)
    if not args.no_baseline:
      res.update(run_theirs(workdir, calibs, eval_path, args))
  rows = summarize(res)
  print(f"{args.model}, g128 sym, {args.draws} calibration draws of {args.nsamples} x "
        f"{args.seqlen} tokens (SOTU 1990-2015, seeds 0..{args.draws - 1}); perplexity on "
        f"{n_eval} x {args.seqlen} held-out tokens (2016-2021); float "
        f"{rows['float']['ppl_mean']:.3f}")
  print(table(("bits/impl/case", "ppl mean", "ppl std", "min..max", "vs float (mean ± std)",
               "seconds"),
              [(k, r["ppl_mean"], r["ppl_std"], f"{r['ppl_min']:.2f}..{r['ppl_max']:.2f}",
                f"{r['increase_mean']:+.2%} ± {r['increase_std']:.2%}", r["seconds_mean"])
               for k, r in rows.items() if k != "float"]))
  for note in args.notes:
    print("not run: " + note)
  summary = checks(rows, args.bits)
  print(summary)
  emit_json({"bench": "quality_distributions", "model": args.model, "draws": args.draws,
             "nsamples": args.nsamples, "seqlen": args.seqlen, "eval_windows": n_eval,
             "group_size": 128, "sym": True, "mse": MSE, "refine_steps": args.refine_steps,
             "loadavg": os.getloadavg(), "runs": res, "rows": rows, "not_run": args.notes, **summary})


if __name__ == "__main__":
  main()

"""The flags of ``scripts/quantize_llama.py`` (named after the GPTQConfig fields), the GPTQConfig
they make, and the checks that run before anything is read or written (exit 2 on a bad value)."""

from __future__ import annotations

import argparse
import os

from gptq_jax import data
from gptq_jax.cli import compile_cache, serving
from gptq_jax.config import BACKENDS, FORMATS, MSE_WEIGHTS, GPTQConfig


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="quantize_llama.py", description="GPTQ-quantize a decoder LLM: Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 3, "
                  "Qwen3-MoE, Qwen2-MoE, Mixtral (offline).")
  p.add_argument("--model", default="smollm2-135m",
                 help="HF folder, .gguf file, or an embedded model: 'smollm2-135m' (the default), "
                      "'gemma3-270m'")
  p.add_argument("--output", required=True, help="new folder for the orbax checkpoint")
  p.add_argument("--resume", action="store_true",
                 help="continue an interrupted run writing the same --output")
  p.add_argument("--save-hf", metavar="DIR", help="also export a Hugging Face GPTQ folder")
  p.add_argument("--report", metavar="FILE.json",
                 help="write a JSON report (and FILE.png: loss per layer)")
  g = p.add_argument_group("GPTQ settings (GPTQConfig fields)")
  g.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8")
  g.add_argument("--group-size", type=serving.group_size, default=128,
                 help="> 0, -1 for per-row, or auto (the largest the --target engine runs)")
  g.add_argument("--damp-percent", type=float, default=0.1)
  g.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=False)
  g.add_argument("--act-group-aware", action=argparse.BooleanOptionalAction, default=None,
                 help="GAR (default on; off with --desc-act)")
  g.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True)
  g.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True)
  g.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=False)
  g.add_argument("--format", default="gptq", choices=FORMATS)
  g.add_argument("--backend", default=None, choices=BACKENDS)
  g.add_argument("--mse", type=float, default=0.0,
                 help="clipping search norm (0 = off; 2.4 in the references)")
  g.add_argument("--mse-weight", default="none", choices=MSE_WEIGHTS,
                 help="clipping search error in GPTQ: none (the references') or hessian (each "
                      "column's error over its inverse-Hessian factor diagonal)")
  g.add_argument("--refine-steps", type=int, default=0,
                 help="optax block-wise refinement: Adam steps per block after GPTQ (0 = off; "
                 "32 in the README's table)")
  g.add_argument("--refine-lr", type=float, default=5e-3, help="refinement learning rate")
  g.add_argument("--refine-batch", type=int, default=2, help="refinement samples per step")
  g.add_argument("--refine-seqlen", type=int, default=128,
                 help="refinement trains on each sample's first N tokens (0 = all)")
  g.add_argument("--refine-rounding", action=argparse.BooleanOptionalAction, default=False,
                 help="refinement also learns a rounding offset per weight (AutoRound-style)")
  g.add_argument("--block-size", type=int, default=128, help="lazy-update block (columns)")
  g.add_argument("--dynamic", default=None, metavar="JSON|FILE",
                 help="per-module precision as GPTQModel's dynamic: a JSON object (or a .json "
                      "file) {regex: {bits, group_size, sym, desc_act, mse}}; '-:regex' keeps "
                      "matching modules float (names like model.layers.3.mlp.down_proj)")
  g.add_argument("--lm-head", action=argparse.BooleanOptionalAction, default=False,
                 help="also GPTQ-quantize the output projection (a tied embedding is untied)")
  g.add_argument("--gptaq", action=argparse.BooleanOptionalAction, default=False,
                 help="GPTAQ: also match the float model's inputs (asymmetric calibration)")
  g.add_argument("--gptaq-alpha", type=float, default=0.25, help="GPTAQ's correction weight")
  g.add_argument("--rotation", default="none", choices=("none", "hadamard", "random"),
                 help="rotate the residual stream by an orthogonal matrix before quantizing")
  g.add_argument("--moe-routing", default="native", metavar="{native,all,topk:N}",
                 help="mixtures of experts, calibration passes only: the model's routing "
                      "(native), every expert sees every token (all), or the N most probable "
                      "experts per token (topk:N)")
  g.add_argument("--fallback-threshold", type=float, default=0.005,
                 help="mixtures of experts: an expert that receives fewer than this fraction of "
                      "the calibration tokens is quantized by round-to-nearest (0.005 = 0.5%%, "
                      "GPTQModel's default; an expert with no token always is)")
  d = p.add_argument_group("calibration and evaluation")
  d.add_argument("--dataset", default=None,
                 help="wikitext2 | c4 | c4-new | a .txt file or folder | a .npy [n, seqlen] token "
                      "array (default: the bundled State of the Union text, 1990-2015)")
  d.add_argument("--nsamples", type=int, default=128)
  d.add_argument("--seqlen", type=int, default=2048)
  d.add_argument("--seed", type=int, default=0)
  d.add_argument("--batch-size", type=int, default=None, help="calibration samples per forward")
  d.add_argument("--eval-text", default="sotu-eval",
                 help="text for perplexity before/after: a .txt file or folder (default "
                      "'sotu-eval': the bundled 2016-2021 addresses, held out from "
                      "calibration); 'none' to skip")
  d.add_argument("--eval-windows", type=int, default=16, help="windows of --seqlen to score")
  d.add_argument("--sample-prompt", default="The state of the union is",
                 help="prompt for a sample generation after quantization ('' to skip)")
  p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                 help="dtype of the weights and the calibration forward (default: the "
                      "checkpoint's own; Hessians are always accumulated in float32)")
  p.add_argument("--no-progress", action="store_true", help="no progress line")
  p.add_argument("--stash-mb", type=float, default=None,
                 help="MiB per device for the linear inputs kept between a block's passes (so "
                      "each pass does not rerun the block from its input); default: half the "
                      "free device (or host) memory; 0: recompute")
  p.add_argument("--spread-solves", default="auto", choices=("auto", "on", "off"),
                 help="split each GPTQ solve's output rows over this process's devices (same "
                      "codes); auto: on with several TPUs/GPUs, off on CPU")
  p.add_argument("--breakdown", action="store_true",
                 help="time each phase exactly (waits for the devices at each phase's end) and "
                      "print where the time went")
  m = p.add_argument_group("several hosts (jax.distributed; automatic on a multi-host TPU slice)")
  m.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
  m.add_argument("--num-processes", type=int, help="how many processes take part")
  m.add_argument("--process-id", type=int, help="this process's index in [0, --num-processes)")
  compile_cache.add_flag(p)
  serving.add_flags(p)
  return p


def _config(args) -> GPTQConfig:
  group = 128 if args.group_size == "auto" else args.group_size  # auto: picked in serving.apply
  kw = dict(group_size=group, damp_percent=args.damp_percent, desc_act=args.desc_act,
            sym=args.sym, true_sequential=args.true_sequential, static_groups=args.static_groups,
            format=args.format, backend=args.backend, mse=args.mse, mse_weight=args.mse_weight,
            block_size=args.block_size,
            refine_steps=args.refine_steps, refine_lr=args.refine_lr,
            refine_rounding=args.refine_rounding, refine_batch=args.refine_batch,
            refine_seqlen=args.refine_seqlen,
            gptaq=args.gptaq, gptaq_alpha=args.gptaq_alpha, rotation=args.rotation,
            moe_routing=args.moe_routing, fallback_threshold=args.fallback_threshold,
            nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
  if args.act_group_aware is not None:
    kw["act_group_aware"] = args.act_group_aware
  elif args.desc_act:
    kw["act_group_aware"] = False
  if args.dynamic is not None:  # a JSON string, or a file holding one
    kw["dynamic"] = (open(args.dynamic).read() if os.path.isfile(args.dynamic)  # noqa: SIM115
                     else args.dynamic)
  kw["lm_head"] = args.lm_head
  if args.dataset is not None and args.dataset.endswith(".npy"):
    kw["dataset"] = os.path.abspath(args.dataset)
  elif args.dataset is not None:
    kw["dataset"] = args.dataset
  return GPTQConfig(args.bits, **kw)


def _check_creatable(flag: str, path: str) -> None:
  """Missing parent folders are created when the run writes; the nearest existing one must be a
  writable folder."""
  from gptq_jax.checkpoint import check_creatable  # noqa: PLC0415

  try:
    check_creatable(path)
  except (NotADirectoryError, PermissionError) as e:
    raise type(e)(f"{flag} {e}") from None


def _check_args(args) -> None:
  """Everything that can be checked before loading the model: a bad value fails in a second,
  before anything is written."""
  from gptq_jax.models import resolve_model_spec  # noqa: PLC0415

  resolve_model_spec(args.model)  # a missing model or a hub id fails here, before any work
  if os.path.exists(args.output):
    raise FileExistsError(f"--output {args.output!r} already exists: choose another folder "
                          "(nothing was overwritten)")
  if args.save_hf and os.path.exists(args.save_hf):
    raise FileExistsError(f"--save-hf {args.save_hf!r} already exists: choose another folder")
  for flag, path in (("--output", args.output), ("--report", args.report),
                     ("--save-hf", args.save_hf)):
    if path:
      _check_creatable(flag, path)
  if args.report and not args.report.endswith(".json"):
    raise ValueError(f"--report {args.report!r} must end with .json (the plot goes beside it "
                     "as .png)")
  if args.eval_text.lower() != "none":
    data.check_text(args.eval_text, "--eval-text", also="'none' to skip perplexity")
  for flag, value, low in (("--seqlen", args.seqlen, 2), ("--eval-windows", args.eval_windows, 1),
                           ("--batch-size", args.batch_size, 1)):
    if value is not None and value < low:
      raise ValueError(f"{flag}={value} is invalid: expected an integer >= {low}")
  serving.check_flags(args)
  if args.save_hf:
    try:
      import gptq_jax.interop  # noqa: F401,PLC0415 (optional: only --save-hf needs it)
    except ImportError as e:
      raise ValueError(f"--save-hf is unavailable in this installation ({e})") from None

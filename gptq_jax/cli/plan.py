"""``scripts/plan.py``: what a quantization run needs on a TPU slice, compiled, before it runs.

  .venv-tpu/bin/python scripts/plan.py --model <HF folder | config.json | embedded name>
      --topology v5e:2x4 [--num-hosts N] [--nsamples --seqlen --batch-size --bits --group-size
      --desc-act --gptaq --refine-steps --dtype] [--json]

Compiles every program the run would run (``gptq_jax/plan``), with the model's real shapes and no
weights, for the slice (libtpu's compile-only client: no TPU needed, ``.venv-tpu`` from
scripts/setup_tpu.sh), and prints per chip the compiler's HBM peak against the chip's HBM, the host
memory of the streamed run, the time per block and in total at the roofline, and packed decode
against bf16. Exit 0 when the run fits, 3 when it does not (with one line naming the setting to
change), 2 on bad input. ``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from gptq_jax.config import GPTQConfig



def _b(n: float) -> str:
  from gptq_jax.plan.planner import fmt_bytes  # noqa: PLC0415

  return fmt_bytes(n)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="plan.py", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="HF folder, its config.json, or an embedded name")
  p.add_argument("--topology", required=True,
                 help="v5e:2x4, v6e:2x4, v5p:2x2x1, v4:2x2x1 (libtpu) or v5e-8, v6e-8, v5p-8, v4-8")
  p.add_argument("--num-hosts", type=int, default=None, help="hosts the chips are split over")
  p.add_argument("--nsamples", type=int, default=128)
  p.add_argument("--seqlen", type=int, default=2048)
  p.add_argument("--batch-size", type=int, default=None, help="calibration samples per forward")
  p.add_argument("--bits", type=int, default=4)
  p.add_argument("--group-size", type=int, default=128)
  p.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=False)
  p.add_argument("--gptaq", action=argparse.BooleanOptionalAction, default=False)
  p.add_argument("--refine-steps", type=int, default=0)
  p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                 help="default: the checkpoint's own (bfloat16 when config.json says so)")
  p.add_argument("--eval-windows", type=int, default=0,
                 help="held-out windows the run carries for perplexity (the quantize CLI: 16)")
  p.add_argument("--stash-mb", type=float, default=None, help="as quantize_llama.py's")
  p.add_argument("--serving", action=argparse.BooleanOptionalAction, default=True,
                 help="also plan packed decode at batch 1 / 8 / 64 against bf16")
  p.add_argument("--figures", default=None, metavar="FILE.json",
                 help="keep the compiler's figures of each program here across runs (looked up "
                      "by the program's lowered text, the slice and the compiler version; default "
                      "<cache>/plan_figures.json; '' keeps none)")
  p.add_argument("--figures-only", action="store_true",
                 help="compile nothing: every program's figures must be in --figures (one "
                      "missing is an error naming it)")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  return p


def read_model_config(spec: str):
  """(ModelConfig, the checkpoint's dtype name) from an HF folder, a config.json or an embedded
  name; nothing but the config is read."""
  from gptq_jax.models.config import ModelConfig  # noqa: PLC0415
  from gptq_jax.models.embedded import embedded_model  # noqa: PLC0415

  if not os.path.exists(spec) and embedded_model(spec) is not None:
    from gptq_jax.models.gguf import GGUFCheckpoint  # noqa: PLC0415

    return GGUFCheckpoint(embedded_model(spec).gguf_path()).config, "float32"
  path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
  if not os.path.isfile(path) or not path.endswith(".json"):
    raise FileNotFoundError(f"--model {spec!r}: expected an HF folder with a config.json, a "
                            "config.json file, or an embedded name (smollm2-135m, gemma3-270m)")
  with open(path) as f:
    raw = json.load(f)
  name = str(raw.get("torch_dtype") or raw.get("dtype") or "float32")
  return ModelConfig.from_hf_dict(raw), ("bfloat16" if "bfloat16" in name else "float32")


def settings_from(args, model_config, native_dtype: str, cfg: GPTQConfig):
  from gptq_jax.plan.layout import RunSettings  # noqa: PLC0415

  dtype = args.dtype or native_dtype
  stash = None if getattr(args, "stash_mb", None) is None else int(args.stash_mb * 2**20)
  return RunSettings(model=model_config.replace(dtype=dtype), cfg=cfg, nsamples=args.nsamples,
                     seqlen=args.seqlen, batch_size=args.batch_size,
                     eval_windows=getattr(args, "eval_windows", 0), stash_bytes=stash)


def report_text(plan: dict) -> str:
  """The plan for a reader: per chip, host, time, serving; the refusal when it does not fit."""
  s = plan["settings"]
  lines = [f"{plan['model']} on {plan['topology']} ({plan['chips']} {plan['generation']} chips, "
           f"{plan['num_hosts']} host(s)); {s['nsamples']} x {s['seqlen']} calibration tokens in "
           f"{s['micro_batches']} micro-batches of {s['micro_batch']}, {s['dtype']}, "
           f"{s['bits']}-bit g{s['group_size']}"
           + (", desc_act" if s["desc_act"] else "") + (", GPTAQ" if s["gptaq"] else "")
           + (f", refine {s['refine_steps']} steps" if s["refine_steps"] else ""),
           f"HBM per chip (compiler): peak {_b(plan['hbm_peak_bytes_per_chip'])} of "
           f"{_b(plan['hbm_bytes_per_chip'])} at '{plan['peak_program']}' -> "
           + ("fits" if plan["fits"] else "DOES NOT FIT"),
           "  at the peak: " + ", ".join(f"{k} {_b(v)}"
                                         for k, v in plan["peak_parts"].items() if v),
           f"host memory per host (counted): {_b(plan['host_peak_bytes'])} ("
           + ", ".join(f"{k} {_b(v)}" for k, v in plan["host_parts"].items()) + ")",
           "time at the roofline (compiler FLOPs and bytes over the chip's peak; a lower bound): "
           + ", ".join(f"{v:.3g} s per {k} block" for k, v in plan["est_seconds_per_block"].items())
           + f", {plan['est_seconds'] / 60:.3g} min in total"]
  if plan["programs_with_loops"]:
    steps = ", ".join(f"{v:,}" for v in plan["column_steps_per_block"].values())
    lines.append(f"  ({len(plan['programs_with_loops'])} programs hold loops whose bodies the "
                 "compiler's cost counts once: the solves' column loops"
                 + (", refinement's steps" if s["refine_steps"] else "")
                 + f"; the column loops take {steps} sequential column steps per block)")
  for row in plan.get("serving") or ():
    q, f = row["packed"], row["bf16"]
    lines.append(f"decode batch {row['batch']:>2}: packed {q['tokens_per_s_per_chip']:,.0f} "
                 f"tokens/s per chip vs bf16 {f['tokens_per_s_per_chip']:,.0f} "
                 f"({row['speedup']:.2f}x; weights {_b(q['weight_bytes'])} vs "
                 f"{_b(f['weight_bytes'])}) at the roofline")
  if plan.get("serving_refusal"):
    lines.append(plan["serving_refusal"])
  if plan["refusal"]:
    lines.append(plan["refusal"])
  return "\n".join(lines)


def run(args) -> dict:
  from gptq_jax.models.embedded import cache_dir  # noqa: PLC0415
  from gptq_jax.plan import measure, planner, slices  # noqa: PLC0415

  figures = args.figures if args.figures is not None else os.path.join(cache_dir(),
                                                                        "plan_figures.json")
  if args.figures_only and not figures:
    raise ValueError("--figures-only needs --figures FILE (the recorded compiler figures)")
  measure.use_figures_file(figures or None, strict=args.figures_only)
  model_config, native = read_model_config(args.model)
  cfg = GPTQConfig(args.bits, group_size=args.group_size, desc_act=args.desc_act,
                   act_group_aware=not args.desc_act, gptaq=args.gptaq,
                   refine_steps=args.refine_steps, nsamples=args.nsamples, seqlen=args.seqlen)
  settings = settings_from(args, model_config, native, cfg)
  planner.check_plannable(settings)  # before libtpu starts
  sl = slices.compile_only(args.topology, args.num_hosts)
  plan = planner.plan_quantization(settings, sl, with_serving=args.serving)
  plan["model"] = args.model
  return plan


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    plan = run(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(plan) if args.json else report_text(plan), flush=True)
  return 0 if plan["fits"] else 3

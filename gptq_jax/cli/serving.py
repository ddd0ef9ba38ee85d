"""``quantize_llama.py``'s serving flags: ``--hf-format`` (the ``--save-hf`` layout), ``--target``
(check the settings against one engine before any work) and ``--group-size auto`` (docs/serving.md).
"""

from __future__ import annotations

import argparse

TARGET_NAMES = ("vllm", "tpu-inference", "transformers")


def group_size(value: str) -> int | str:
  """``--group-size``: an int (> 0, or -1) or ``auto``."""
  if value == "auto":
    return value
  try:
    return int(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an int (> 0, or -1) or 'auto', got {value!r}"
                                     ) from None


def add_flags(p: argparse.ArgumentParser) -> None:
  from gptq_jax.interop.formats import HF_FORMAT_NAMES  # noqa: PLC0415

  s = p.add_argument_group("serving (docs/serving.md)")
  s.add_argument("--hf-format", default=None, choices=HF_FORMAT_NAMES,
                 help="layout of the --save-hf folder (default gptq)")
  s.add_argument("--target", default=None, choices=TARGET_NAMES,
                 help="check the settings against this engine before any work (refused with the "
                      "setting to change); with --group-size auto, pick the group size it runs")


def check_flags(args) -> None:
  """The checks that need no model (run with the other argument checks)."""
  if args.hf_format and not args.save_hf:
    raise ValueError("--hf-format sets the layout of the --save-hf folder: pass --save-hf DIR")
  if args.group_size == "auto" and not args.target:
    raise ValueError("--group-size auto picks the group size the --target engine runs: pass "
                     f"--target ({', '.join(TARGET_NAMES)}) or a number")


def apply(args, cfg, model_config, say):
  """``cfg`` checked against ``--target`` / ``--hf-format`` (and its group size picked with
  ``auto``) once the model's config is known, before any work. Raises one line naming the
  setting to change."""
  from gptq_jax.interop import formats, targets  # noqa: PLC0415

  hf_format = args.hf_format or targets.GPTQ
  if args.group_size == "auto":
    cfg = cfg.replace(group_size=targets.auto_group_size(model_config, cfg, args.target,
                                                         hf_format))
    say(f"--group-size auto: {cfg.group_size} (the largest of {targets.AUTO_GROUP_SIZES} that "
        f"--target {args.target} runs)")
  if args.save_hf:
    formats.get(hf_format).check(model_config, cfg)
  if args.target:
    why = targets.target_refusal(model_config, cfg, args.target, hf_format)
    if why:
      fix = targets.suggest(model_config, cfg, args.target, hf_format)
      raise ValueError(f"--target {args.target}: {why}" + (f" (change: {fix})" if fix else ""))
    say(f"--target {args.target}: {', '.join(targets.TARGETS[args.target][hf_format])} can run "
        f"the {hf_format} export of these settings")
  return cfg

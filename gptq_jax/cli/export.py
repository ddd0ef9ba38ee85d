"""``scripts/export.py``: export a quantized checkpoint without re-quantizing, or say which serving
engines can run a folder (docs/serving.md).

  export.py --model CHECKPOINT --output DIR [--hf-format {gptq,compressed-tensors}]
  export.py --check DIR

``--model`` takes an orbax checkpoint written by quantize_llama.py (streamed a part at a time, as
``--save-hf`` does, so the folder is the one ``--save-hf`` writes), an HF GPTQ folder or a
compressed-tensors folder. Every export prints the engine table and records it in
``DIR/serving_engines.json``; ``--check`` prints it for any exported folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from gptq_jax.interop.formats import HF_FORMAT_NAMES

FLOAT_DTYPES = ("float16", "bfloat16", "float32")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="export.py", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", help="orbax checkpoint, HF GPTQ folder or compressed-tensors folder")
  p.add_argument("--output", help="new folder for the Hugging Face export")
  p.add_argument("--hf-format", default="gptq", choices=HF_FORMAT_NAMES)
  p.add_argument("--dtype", default="float16", choices=FLOAT_DTYPES,
                 help="dtype of the float tensors (and compressed-tensors scales)")
  p.add_argument("--check", metavar="DIR", help="print which engines can run DIR, and why not")
  return p


class _CopiedTokenizer:
  """Saves a tokenizer by copying the files another ``save_pretrained`` wrote (byte for byte)."""

  def __init__(self, folder: str):
    self.folder = folder

  def save_pretrained(self, dest: str) -> None:
    for name in sorted(os.listdir(self.folder)):
      if os.path.isfile(os.path.join(self.folder, name)):
        shutil.copy2(os.path.join(self.folder, name), os.path.join(dest, name))


def _recorded_calibration(meta: dict, cfg) -> dict | None:
  """What the quantize run recorded about its calibration data (orbax meta)."""
  if meta.get("calibration_source"):
    return meta["calibration_source"]
  if cfg.dataset is None and "records" in meta:  # a quantize_llama.py run on its default text
    from gptq_jax.interop.calibration import describe_default  # noqa: PLC0415

    return describe_default(cfg.nsamples, cfg.seqlen)
  return None


def _folder_calibration(folder: str) -> dict | None:
  with open(os.path.join(folder, "config.json")) as f:
    qc = json.load(f).get("quantization_config") or {}
  qc = (qc.get("gptq_jax") or {}).get("gptq_config") or qc  # compressed-tensors keeps it there
  meta = qc.get("meta") if isinstance(qc.get("meta"), dict) else {}
  return meta.get("calibration")


def _orbax_meta(path: str) -> dict:
  """The JSON meta of an orbax checkpoint's latest step (no array is read)."""
  from gptq_jax import checkpoint  # noqa: PLC0415

  orbax = os.path.join(path, "orbax")
  found = checkpoint.steps(orbax)
  if not found:
    raise FileNotFoundError(f"{path!r} holds no finished checkpoint (an interrupted save?)")
  return checkpoint.read_meta(orbax, found[-1])


def _export_orbax(args, path: str) -> None:
  from gptq_jax import checkpoint  # noqa: PLC0415
  from gptq_jax.checkpoint_parts import PARTS  # noqa: PLC0415
  from gptq_jax.cli import output  # noqa: PLC0415
  from gptq_jax.config import GPTQConfig  # noqa: PLC0415
  from gptq_jax.interop import formats  # noqa: PLC0415
  from gptq_jax.models import ModelConfig  # noqa: PLC0415

  meta = _orbax_meta(path)
  if meta.get("quant_config") is None:
    raise ValueError(f"{path!r} is a float checkpoint: quantize it with quantize_llama.py")
  cfg = GPTQConfig.from_dict(meta["quant_config"])
  tok_dir = os.path.join(path, "tokenizer")
  tok = _CopiedTokenizer(tok_dir) if os.path.isdir(tok_dir) else None
  source = _recorded_calibration(meta, cfg)
  if PARTS in meta:  # written a part at a time by quantize_llama.py: exported as --save-hf does
    model_config = ModelConfig.from_hf_dict(meta["model_config"]).replace(
        dtype=meta.get("compute_dtype", "float32"))
    output.export_hf(args.output, path, model_config=model_config, quant_config=cfg,
                     tokenizer=tok, calibration_source=source, hf_format=args.hf_format)
    return
  ckpt = checkpoint.read(path)
  formats.export(args.output, ckpt.params, ckpt.model_config, cfg, tok, hf_format=args.hf_format,
                 dtype=args.dtype, calibration_source=source)


def _export_folder(args, path: str) -> None:
  """An HF GPTQ or compressed-tensors folder, re-laid out (the weights are not re-quantized)."""
  from gptq_jax.interop import formats  # noqa: PLC0415
  from gptq_jax.loading import open_model  # noqa: PLC0415

  loaded = open_model(path)
  formats.export(args.output, loaded.params, loaded.config, loaded.quant_config,
                 _FolderTokenizer(path),
                 hf_format=args.hf_format, dtype=args.dtype,
                 calibration_source=_folder_calibration(path))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                    "chat_template.jinja")


class _FolderTokenizer(_CopiedTokenizer):
  """The tokenizer files of an HF folder (copied as they are)."""

  def save_pretrained(self, dest: str) -> None:
    for name in _TOKENIZER_FILES:
      if os.path.isfile(os.path.join(self.folder, name)):
        shutil.copy2(os.path.join(self.folder, name), os.path.join(dest, name))


def export(args) -> dict:
  """Export ``args.model`` to ``args.output`` in ``args.hf_format``; print and record the engines."""
  from gptq_jax import loading  # noqa: PLC0415

  if not args.model or not args.output:
    raise ValueError("pass --model CHECKPOINT and --output DIR (or --check DIR)")
  if os.path.exists(args.output):
    raise FileExistsError(f"--output {args.output!r} already exists: choose another folder "
                          "(nothing was overwritten)")
  kind, path = loading.detect(args.model)
  if kind == loading.ORBAX:
    _export_orbax(args, path)
  elif kind in (loading.HF_GPTQ, loading.HF_CT):
    _export_folder(args, path)
  else:
    raise ValueError(f"{args.model!r} is a float model ({kind}): export.py does not quantize; "
                     "run scripts/quantize_llama.py --save-hf DIR instead")
  print(f"exported {args.model} to {args.output} ({args.hf_format})", flush=True)
  return report(args.output, write=True)


def report(folder: str, write: bool = False) -> dict:
  """Print which engines can run ``folder`` (and write ``serving_engines.json`` with ``write``)."""
  from gptq_jax.interop import engines  # noqa: PLC0415

  facts = engines.facts_of_folder(folder)
  results = engines.record(folder, facts) if write else engines.check(facts)
  print(f"serving engines for {folder} ({facts.hf_format}):\n{engines.table(results)}", flush=True)
  return results


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.check:
      if args.model or args.output:
        raise ValueError("--check DIR takes no --model / --output")
      report(args.check)
    else:
      export(args)
  except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def script_main() -> None:
  """``scripts/export.py``: after an error line, exit without orbax's noisy teardown."""
  status = main()
  sys.stdout.flush()
  sys.stderr.flush()
  if status:
    os._exit(status)
  sys.exit(status)

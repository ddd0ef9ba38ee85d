"""`load_model` / `load_tokenizer`: one entry point (any supported family) for a Hugging Face folder,
a .gguf file or an embedded model ("smollm2-135m", "gemma3-270m": models/embedded.py). Offline by
design: hub model ids are refused with a clear message.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Literal

import jax.numpy as jnp

from gptq_jax.models.config import ModelConfig
from gptq_jax.models.embedded import EMBEDDED_MODELS, embedded_model
from gptq_jax.models.gguf import load_gguf, load_gguf_tokenizer
from gptq_jax.models.hf import load_hf_folder
from gptq_jax.models.params import ModelParams, as_model_params

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WHAT_TO_PASS = ("pass a local Hugging Face folder (config.json + model.safetensors), a .gguf "
                 f"file, or an embedded model: {', '.join(map(repr, EMBEDDED_MODELS))}")


def resolve_model_spec(spec: str | os.PathLike) -> tuple[Literal["hf", "gguf"], str]:
  """("hf", folder) or ("gguf", file) for a model spec; clear errors for anything else."""
  spec = os.fspath(spec)
  if not os.path.exists(spec):
    if embedded_model(spec) is not None:
      return "gguf", embedded_model(spec).gguf_path()
    if _HUB_ID.match(spec):  # a mistyped local path first; then why the hub is no way either
      raise FileNotFoundError(f"model {spec!r} not found: no such local path "
                              f"({os.path.abspath(spec)}); as a Hugging Face hub id it cannot be "
                              "fetched either: the hub is unreachable offline (and gptq_jax never "
                              f"downloads): {_WHAT_TO_PASS}")
    raise FileNotFoundError(f"model {spec!r} not found: {_WHAT_TO_PASS}")
  if os.path.isdir(spec):
    return "hf", spec
  if spec.lower().endswith(".gguf"):
    return "gguf", spec
  raise ValueError(f"model {spec!r} is a file but not a .gguf: {_WHAT_TO_PASS}")


def _refuse_quantized(spec: str | os.PathLike) -> None:
  folder = os.fspath(spec)
  if not os.path.isdir(folder):
    return
  what = None
  if os.path.isdir(os.path.join(folder, "orbax")):
    what = "a gptq_jax checkpoint"
  elif os.path.isfile(os.path.join(folder, "quantize_config.json")):
    what = "a quantized Hugging Face folder"
  elif os.path.isfile(os.path.join(folder, "config.json")):
    with open(os.path.join(folder, "config.json")) as f:
      if "quantization_config" in json.load(f):
        what = "a quantized Hugging Face folder"
  if what:
    raise ValueError(f"{folder!r} is {what}: gptq_jax.models.load_model reads float models only; "
                     "gptq_jax.load_model reads every format (packed kernels as PackedWeight)")


def load_model(spec: str | os.PathLike, dtype: Any = jnp.float32
               ) -> tuple[ModelConfig, ModelParams]:
  """(config, float params) from an HF folder, a .gguf file or an embedded name; params in
  `dtype`, a `ModelParams` carrying the config (so `gptq_jax.quantize(params, calib, cfg)` needs
  nothing else). An orbax checkpoint or an HF GPTQ folder is refused: `gptq_jax.load_model` reads
  those (packed kernels as PackedWeight)."""
  _refuse_quantized(spec)
  kind, path = resolve_model_spec(spec)
  if kind == "hf":
    cfg, params = load_hf_folder(path, dtype)
  else:
    cfg, params = load_gguf(path, dtype)
  return cfg, as_model_params(params, cfg)


def load_tokenizer(spec: str | os.PathLike):
  """The transformers tokenizer of a model spec (from the folder, or built from the GGUF)."""
  if not os.path.exists(os.fspath(spec)) and embedded_model(os.fspath(spec)) is not None:
    return embedded_model(os.fspath(spec)).tokenizer()  # saved once, fast afterwards
  kind, path = resolve_model_spec(spec)
  if kind == "gguf":
    return load_gguf_tokenizer(path)
  from transformers import AutoTokenizer  # noqa: PLC0415 (optional dependency)

  try:
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError) as e:
    raise ValueError(f"no tokenizer could be loaded from {path!r} ({e}); save one there with "
                     "tokenizer.save_pretrained(folder)") from None


load_llama = load_model  # the pre-families name

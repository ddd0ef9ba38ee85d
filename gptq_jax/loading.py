"""``gptq_jax.load_model``: one entry point for every model format, saying what it found.

Takes an orbax checkpoint folder (written by ``checkpoint.save`` / ``scripts/quantize_llama.py``),
a Hugging Face GPTQ folder (``gptq`` v1 or ``gptq_v2``, e.g. an ``export_hf`` or a GPTQModel
output), a compressed-tensors pack-quantized folder (llm-compressor's layout), a Hugging Face float
folder, a ``.gguf`` file, or an embedded model name. The format is
decided from the files, never from the name, and said in one log line ("orbax checkpoint (gptq,
4-bit g128)", "HF GPTQ folder (gptq_v2, 4-bit g128)", "HF float folder (llama)", ...).

``gptq_jax.models.load_model`` / ``load_llama`` read the float formats only (HF folder, GGUF,
embedded name); this module adds the quantized ones on top and is what the scripts use.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, NamedTuple

import jax.numpy as jnp

log = logging.getLogger("gptq_jax")

ORBAX = "orbax"
HF_GPTQ = "hf_gptq"
HF_CT = "hf_compressed_tensors"
HF_FLOAT = "hf_float"
GGUF = "gguf"


class LoadedModel(NamedTuple):
  config: Any  # the model config (LlamaConfig / ModelConfig)
  params: Any  # quantized kernels as PackedWeight
  quant_config: Any  # GPTQConfig, or None for a float model
  kind: str  # ORBAX, HF_GPTQ, HF_FLOAT or GGUF
  description: str  # what was found, for the log line
  tokenizer_source: str | None  # a folder or a .gguf file the tokenizer loads from

  def tokenizer(self):
    """The model's transformers tokenizer; a clear error when none was saved with it."""
    if self.tokenizer_source is None:
      raise ValueError(f"this {self.description} has no tokenizer saved with it: pass --tokens "
                       "(token ids) instead of text, or save one beside the model")
    from gptq_jax.models import load_tokenizer  # noqa: PLC0415

    return load_tokenizer(self.tokenizer_source)


def _gptq_config_dict(folder: str) -> dict | None:
  config = os.path.join(folder, "config.json")
  qc = None
  if os.path.isfile(config):
    with open(config) as f:
      qc = json.load(f).get("quantization_config")
  legacy = os.path.join(folder, "quantize_config.json")
  if qc is None and os.path.isfile(legacy):
    with open(legacy) as f:
      qc = json.load(f)
  if isinstance(qc, dict) and str(qc.get("quant_method", "gptq")).lower() == "gptq":
    return qc
  return None


def detect(spec: str | os.PathLike) -> tuple[str, str]:
  """``(kind, path)`` of a model spec, from its files (see the module doc)."""
  from gptq_jax import checkpoint  # noqa: PLC0415
  from gptq_jax.models import resolve_model_spec  # noqa: PLC0415

  spec = os.fspath(spec)
  if os.path.isdir(spec) and checkpoint.is_checkpoint(spec):
    return ORBAX, spec
  kind, path = resolve_model_spec(spec)
  if kind == "gguf":
    return GGUF, path
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"{spec!r} is neither a gptq_jax checkpoint folder (no orbax/ inside) "
                            "nor a Hugging Face folder (no config.json)")
  if _gptq_config_dict(path) is not None:
    return HF_GPTQ, path
  from gptq_jax.interop.compressed_tensors import read_ct_config  # noqa: PLC0415

  if read_ct_config(path) is not None:
    return HF_CT, path
  return HF_FLOAT, path


def describe_quant(cfg: Any) -> str:
  """``"gptq_v2, 4-bit g128"`` (plus act-order / dynamic / lm_head when set)."""
  group = "per-channel" if cfg.group_size == -1 else f"g{cfg.group_size}"
  extras = [x for x, on in (("act-order", cfg.desc_act),
                            ("dynamic", bool(getattr(cfg, "dynamic", None))),
                            ("lm_head", getattr(cfg, "lm_head", False))) if on]
  return ", ".join([cfg.format, f"{cfg.bits}-bit {group}", *extras])


def open_model(spec: str | os.PathLike, dtype: Any = jnp.float32) -> LoadedModel:
  """Load any supported format (see the module doc) and log what it was."""
  from gptq_jax import checkpoint  # noqa: PLC0415

  kind, path = detect(spec)
  if kind == ORBAX:
    ckpt = checkpoint.read(path)
    what = "float" if ckpt.quant_config is None else f"gptq: {describe_quant(ckpt.quant_config)}"
    loaded = LoadedModel(ckpt.model_config, ckpt.params, ckpt.quant_config, kind,
                         f"orbax checkpoint ({what})", ckpt.tokenizer_dir)
  elif kind == HF_GPTQ:
    from gptq_jax.interop import import_hf  # noqa: PLC0415

    config, params, qcfg = import_hf(path, dtype)
    loaded = LoadedModel(config, params, qcfg, kind,
                         f"HF GPTQ folder ({describe_quant(qcfg)})", path)
  elif kind == HF_CT:
    from gptq_jax.interop.compressed_tensors import import_ct  # noqa: PLC0415

    config, params, qcfg = import_ct(path, dtype)
    loaded = LoadedModel(config, params, qcfg, kind,
                         f"HF compressed-tensors folder ({describe_quant(qcfg)})", path)
  else:
    from gptq_jax.models import load_model as load_float  # noqa: PLC0415

    config, params = load_float(path, dtype=dtype)
    family = getattr(config, "model_type", "llama")
    if kind == GGUF:
      name = os.fspath(spec)
      embedded = not os.path.exists(name)
      what = f"embedded model {name} (GGUF, {family})" if embedded else f"GGUF file ({family})"
      loaded = LoadedModel(config, params, None, kind, what, path)
    else:
      loaded = LoadedModel(config, params, None, kind, f"HF float folder ({family})", path)
  log.info("%s: %s", os.fspath(spec), loaded.description)
  return loaded


def load_model(spec: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[Any, Any]:
  """``(config, params)`` from any supported format (quantized kernels as PackedWeight)."""
  loaded = open_model(spec, dtype)
  return loaded.config, loaded.params

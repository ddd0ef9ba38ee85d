"""The Hugging Face export layouts by name: ``gptq`` (hf_gptq.py) and ``compressed-tensors``
(compressed_tensors.py). Each is a per-linear tensor writer, a config writer and an up-front
check; the folder writing itself (shards, index, atomic rename) is shared (``hf_gptq.FolderWriter``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from gptq_jax.config import GPTQConfig
from gptq_jax.interop import compressed_tensors as ct
from gptq_jax.interop import hf_gptq
from gptq_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class HFFormat:
  name: str
  linear: Callable  # (weight, cfg, name, hf_shape, dtype) -> {tensor name: array}
  configs: Callable  # (folder, model_config, cfg, dtype, tokenizer, *, calibration_source)
  check: Callable[[ModelConfig, GPTQConfig], None]  # raises one line for what it cannot store


def _no_check(model_config: ModelConfig, cfg: GPTQConfig) -> None:
  del model_config, cfg  # the GPTQ layout stores every GPTQConfig


FORMATS = {
    "gptq": HFFormat("gptq", hf_gptq.gptq_linear, hf_gptq.write_configs, _no_check),
    ct.CT_METHOD: HFFormat(ct.CT_METHOD, ct.ct_linear, ct.write_configs, ct.check_expressible),
}
HF_FORMAT_NAMES = tuple(FORMATS)


def get(name: str) -> HFFormat:
  if name not in FORMATS:
    raise ValueError(f"hf_format={name!r} is not allowed: use one of {HF_FORMAT_NAMES}")
  return FORMATS[name]


def writer(path: str | os.PathLike, model_config: ModelConfig, cfg: GPTQConfig, *,
           hf_format: str = "gptq", **kwargs: Any) -> hf_gptq.FolderWriter:
  """A ``FolderWriter`` for ``hf_format`` (checked first: nothing is written when it refuses)."""
  fmt = get(hf_format)
  fmt.check(model_config, cfg)
  return hf_gptq.FolderWriter(path, model_config, cfg, configs=fmt.configs, **kwargs)


def export(path: str | os.PathLike, qparams: Any, model_config: ModelConfig, cfg: GPTQConfig,
           tokenizer: Any = None, *, hf_format: str = "gptq", dtype: Any = "float16",
           calibration_source: dict | None = None) -> str:
  """``export_hf`` in the layout ``hf_format`` (refused up front when it cannot store ``cfg``)."""
  fmt = get(hf_format)
  fmt.check(model_config, cfg)
  return hf_gptq.export_hf(path, qparams, model_config, cfg, tokenizer, dtype=dtype,
                           calibration_source=calibration_source, linear=fmt.linear,
                           configs=fmt.configs)

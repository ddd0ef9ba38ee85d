"""Round-to-nearest for a whole decoder: the baseline GPTQ is measured against.

Every linear that ``quantize`` would quantize gets the same grid (bits, groups, sym, clipping
search) fitted on its own weights, with no calibration data; the result has the same form as
``quantize``'s (``PackedWeight`` kernels in ``cfg.format``), so it evaluates, saves and exports the
same way. Mixture-of-experts layers: each expert's kernel gets its own grid (the experts stacked
back, as ``quantize`` leaves them); the router and a shared-expert gate stay float.
"""

from __future__ import annotations

from typing import Any

import jax

from gptq_jax.config import GPTQConfig
from gptq_jax.core.gptq import rtn_quantize
from gptq_jax.pipeline.adapter import DecoderAdapter, block_adapter, get_path, set_path
from gptq_jax.pipeline.driver import resolve_adapter
from gptq_jax.models.moe_families import FLOAT_BY_DEFAULT


def _rtn(kernel: Any, cfg: GPTQConfig) -> Any:
  if kernel.ndim == 3:  # stacked experts: one grid per expert
    return jax.vmap(lambda k: rtn_quantize(k, cfg))(kernel).pack(cfg.format)
  return rtn_quantize(kernel, cfg).pack(cfg.format)


def rtn_model(params: Any, cfg: GPTQConfig, *, model_config: Any = None,
              adapter: DecoderAdapter | None = None) -> Any:
  """``params`` with every block linear's ``"kernel"`` RTN-quantized to a ``PackedWeight``."""
  adapter = resolve_adapter(params, model_config, adapter)
  for i in range(adapter.num_blocks(params)):
    block = adapter.get_block(params, i)
    for path in (p for group in block_adapter(adapter, i).sequential_groups for p in group):
      if tuple(path) not in FLOAT_BY_DEFAULT:
        block = set_path(block, path + ("kernel",), _rtn(get_path(block, path)["kernel"], cfg))
    params = adapter.set_block(params, i, block)
  return params

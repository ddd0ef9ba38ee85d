"""Per-module precision (GPTQModel's ``dynamic``) and the quantized output projection (``lm_head``).

``dynamic`` maps regex patterns to overrides; modules are named as in Hugging Face checkpoints
(``model.layers.3.mlp.down_proj``, ``lm_head``). Rules are tried in their order and the first whose
pattern matches the *start* of the name decides (``re.match``, as GPTQModel): a ``-:<regex>`` rule
leaves the module in float, a ``+:<regex>`` (or bare) rule overrides bits / group_size / sym /
desc_act / mse for it; a module no rule matches uses the base config. See docs/format.md.

``lm_head=True`` quantizes the output projection after the last block, with GPTQ on the final
norm's outputs (the projection's real inputs). A tied embedding is untied first: the embedding
stays float, the projection becomes its own (quantized) ``lm_head`` and the model config says
``tie_word_embeddings=False``.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

from gptq_jax.config import GPTQConfig, module_config

LM_HEAD = "lm_head"


def module_name(i: int, path: tuple[str, ...]) -> str:
  """The Hugging Face name of linear ``path`` of block ``i`` (what ``dynamic`` patterns match)."""
  return f"model.layers.{i}." + ".".join(path)


_BASE = object()


def resolve(cfg: GPTQConfig, name: str, unmatched: Any = _BASE) -> GPTQConfig | None:
  """The config module ``name`` is quantized with, or None when a ``-:`` rule leaves it float.
  ``unmatched``: what a module no rule matches gets (default ``cfg``; None keeps a module that
  is float by default, a mixture-of-experts router, float unless a rule names it)."""
  for pattern, overrides in cfg.dynamic or ():
    negative = pattern.startswith("-:")
    raw = pattern[2:] if pattern.startswith(("+:", "-:")) else pattern
    if re.match(raw, name):
      if negative:
        return None
      return module_config(cfg, dict(overrides)) if overrides else cfg
  return cfg if unmatched is _BASE else unmatched


def untied(model_config: Any, params: Any) -> Any:
  """``model_config`` with ``tie_word_embeddings=False`` when ``params`` hold their own lm_head."""
  if getattr(model_config, "tie_word_embeddings", False) and LM_HEAD in params:
    return model_config.replace(tie_word_embeddings=False)
  return model_config


@jax.jit
def _xtx(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32) * mask.reshape(-1, 1).astype(jnp.float32)
  return jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST), mask.sum()


def lm_head_hessian(model_config: Any, params: Any, hidden: list, masks: list) -> jax.Array:
  """``2/n X^T X`` of the final norm's outputs over the unmasked calibration tokens."""
  from gptq_jax.models import model as model_lib  # noqa: PLC0415

  norm = jax.jit(lambda p, h: model_lib.CausalLM(model_config).apply(
      {"params": p}, h, method=lambda m, x: m.norm(x)))
  params = {"norm": params["norm"]}  # all the final norm reads
  H, n = 0.0, 0
  for h, mask in zip(hidden, masks):
    xtx, count = _xtx(norm(params, h), mask)
    H, n = H + xtx, n + count
  return 2.0 * H / jnp.maximum(n, 1)


def quantize_lm_head(model_config: Any, params: Any, hidden: list, masks: list, cfg: GPTQConfig,
                     records: list[dict] | None = None) -> Any:
  """``params`` with ``lm_head.kernel`` GPTQ-quantized (packed in ``cfg.format``), or unchanged
  when ``dynamic`` leaves ``lm_head`` in float. ``hidden``: the last block's outputs."""
  from gptq_jax.core.gptq import quantize_weight  # noqa: PLC0415

  head_cfg = resolve(cfg, LM_HEAD)
  if head_cfg is None:
    return params
  if getattr(model_config, "tie_word_embeddings", False):
    kernel = jnp.asarray(params["embed_tokens"]["embedding"]).T  # [hidden, vocab]
  else:
    kernel = params[LM_HEAD]["kernel"]
  H = lm_head_hessian(model_config, params, hidden, masks)
  qw, info = quantize_weight(kernel, H, head_cfg, return_info=True, name=LM_HEAD)
  if records is not None:
    records.append({"block": model_config.num_hidden_layers, "layer": LM_HEAD, "shape": list(kernel.shape),
                    "loss": info.loss, "damp": info.damp, "fallback": info.fallback})
  out = {**params, LM_HEAD: {"kernel": qw.pack(head_cfg.format)}}
  if hasattr(params, "with_config"):  # ModelParams: the config it carries is untied too
    return type(params)(out, untied(model_config, out))
  return out

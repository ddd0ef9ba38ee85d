"""ModelParams: a model's parameter dict that carries its ModelConfig.

A `dict` subclass registered as a JAX pytree (with keys), whose static aux data is the config: so
`jax.tree.map`, `jax.jit` and friends keep the config attached (`params.config`), and
`gptq_jax.quantize(params, calib, cfg)` knows the architecture without being told. The children
are the dict's values in sorted key order; the config is compared and hashed as static data.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax

from gptq_jax.models.config import ModelConfig


class ModelParams(dict):
  """`{"embed_tokens": ..., "layers_0": ..., "norm": ..., ["lm_head": ...]}` plus `.config`."""

  __slots__ = ("config",)

  def __init__(self, tree: Mapping[str, Any] = (), config: ModelConfig | None = None):
    super().__init__(tree)
    if config is None:
      config = getattr(tree, "config", None)
    if not isinstance(config, ModelConfig):
      raise ValueError(f"ModelParams needs a ModelConfig, got {type(config).__name__}")
    self.config = config

  def replace(self, **items: Any) -> ModelParams:
    """A copy with some top-level entries replaced (e.g. `layers_3=new_block`)."""
    return ModelParams({**self, **items}, self.config)

  def with_config(self, config: ModelConfig) -> ModelParams:
    return ModelParams(self, config)

  def to_dict(self) -> dict[str, Any]:
    """A plain dict with the same values (for code that wants no custom pytree node)."""
    return dict(self)

  def __repr__(self) -> str:
    return f"ModelParams({self.config.model_type}, keys={sorted(self)})"

  def __reduce__(self):
    return (ModelParams, (dict(self), self.config))


def _flatten_with_keys(p: ModelParams):
  keys = tuple(sorted(p))
  return [(jax.tree_util.DictKey(k), p[k]) for k in keys], (keys, p.config)


def _flatten(p: ModelParams):
  keys = tuple(sorted(p))
  return [p[k] for k in keys], (keys, p.config)


def _unflatten(aux, children) -> ModelParams:
  keys, config = aux
  out = dict.__new__(ModelParams)
  dict.__init__(out, zip(keys, children))
  out.config = config
  return out


jax.tree_util.register_pytree_with_keys(ModelParams, _flatten_with_keys, _unflatten, _flatten)


def as_model_params(params: Mapping[str, Any], config: ModelConfig) -> ModelParams:
  """`params` as ModelParams carrying `config` (a no-op when they already carry it)."""
  if isinstance(params, ModelParams) and params.config == config:
    return params
  return ModelParams(params, config)


def plain(tree: Any) -> Any:
  """`tree` with every ModelParams node replaced by a plain dict (values untouched)."""
  if isinstance(tree, ModelParams):
    return {k: plain(v) for k, v in tree.items()}
  return tree


def untied(model_config: Any, params: Any) -> Any:
  """`model_config` with `tie_word_embeddings=False` when `params` hold their own lm_head (a
  quantized output projection of a tied model, `GPTQConfig(lm_head=True)`)."""
  if getattr(model_config, "tie_word_embeddings", False) and "lm_head" in params:
    return model_config.replace(tie_word_embeddings=False)
  return model_config

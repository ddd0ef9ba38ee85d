"""Gemma 4's per-layer inputs (PLE) in the one decoder: their embedding, projection and norm, and
the residual each block adds from its slice; and its mixture-of-experts layers, which keep the
dense MLP beside the experts (`dense_and_experts`). (The other Gemma 4 differences are
ModelConfig fields read by attention.py and model.py: per-type head sizes, k_eq_v, the value norm,
shared K/V, the double-wide MLP, `layer_scalar`.)

With `hidden_size_per_layer_input` P > 0, the model computes, once from the token ids and the
first block's input `e` (the scaled token embedding):

    tokens[b, t, l]  = embed_tokens_per_layer[id] * sqrt(P)               (sliced per layer l)
    context[b, t, l] = per_layer_projection_norm(per_layer_model_projection(e) / sqrt(hidden))
    per_layer_inputs = (context + tokens) / sqrt(2)                        [batch, seq, layers, P]

and block l, after its MLP's residual, adds

    h = h + post_per_layer_input_norm(per_layer_projection(act(per_layer_input_gate(h)) * x_l))

with x_l = per_layer_inputs[:, :, l]. The embedding table `embed_tokens_per_layer`
[vocab, layers * P] and `per_layer_model_projection` stay float (they are not in a block); the
gate [hidden -> P] and projection [P -> hidden] are block linears, quantized like the others.

A sparse layer (`enable_moe_block`: `dense_mlp_beside_experts`, router kind "gemma4") computes,
from the attention residual h,

    ff = post_feedforward_layernorm_1(mlp(pre_feedforward_layernorm(h)))
       + post_feedforward_layernorm_2(experts(pre_feedforward_layernorm_2(h), router(h)))

and adds post_feedforward_layernorm(ff) to h: the router (moe.ScaledRouter, params `router/...`)
reads h itself, the experts (moe.Experts, params `experts/{gate,up,down}_proj`, routed dispatch)
their own normed copy.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from gptq_jax.models.config import ModelConfig
from gptq_jax.models.layers import Embed, Linear, RMSNorm
from gptq_jax.models.moe import Experts, route

PER_LAYER_KEYS = ("embed_tokens_per_layer", "per_layer_model_projection",
                  "per_layer_projection_norm")


def per_layer_modules(cfg: ModelConfig, dtype: Any, param_dtype: Any) -> dict[str, Any]:
  """The model-level modules of the per-layer inputs, by their parameter names (CausalLM.setup
  assigns each to the attribute of that name)."""
  p, lp = cfg.hidden_size_per_layer_input, cfg.num_hidden_layers * cfg.hidden_size_per_layer_input
  return {
      "embed_tokens_per_layer": Embed(cfg.vocab_size_per_layer_input, lp, dtype=dtype,
                                      param_dtype=param_dtype),
      "per_layer_model_projection": Linear(cfg.hidden_size, lp, dtype=dtype,
                                           param_dtype=param_dtype),
      "per_layer_projection_norm": RMSNorm(p, cfg.rms_norm_eps, dtype=dtype,
                                           param_dtype=param_dtype,
                                           unit_offset=cfg.norm_unit_offset,
                                           float_scale=cfg.norm_float_scale),
  }


def per_layer_inputs(cfg: ModelConfig, modules: dict[str, Any], input_ids: jax.Array,
                     embeds: jax.Array) -> jax.Array:
  """input_ids [batch, seq], embeds [batch, seq, hidden] (the first block's input) -> every
  block's per-layer input [batch, seq, layers, P] (compute dtype)."""
  b, t = input_ids.shape
  n, p = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
  tokens = modules["embed_tokens_per_layer"](input_ids, p ** 0.5).reshape(b, t, n, p)
  context = modules["per_layer_model_projection"](embeds) * (cfg.hidden_size ** -0.5)
  context = modules["per_layer_projection_norm"](context.reshape(b, t, n, p))
  return (context + tokens) * (2.0 ** -0.5)


def per_layer_input_residual(cfg: ModelConfig, hidden: jax.Array, per_layer_input: jax.Array,
                             linear: Callable[[str, int, int], Any],
                             norm: Callable[[str], Any], act: Callable) -> jax.Array:
  """A block's per-layer input residual (module docstring); called inside the block's compact
  method, so `linear(name, n_in, n_out)` / `norm(name)` make the block's own submodules.

  hidden: [batch, seq, hidden]; per_layer_input: [batch, seq, P] -> [batch, seq, hidden]."""
  if per_layer_input is None:
    raise ValueError("this Gemma 4 block has per-layer inputs (hidden_size_per_layer_input="
                     f"{cfg.hidden_size_per_layer_input}): pass per_layer_input [batch, seq, P]")
  h, p = cfg.hidden_size, cfg.hidden_size_per_layer_input
  gate = act(linear("per_layer_input_gate", h, p)(hidden)) * per_layer_input.astype(hidden.dtype)
  return hidden + norm("post_per_layer_input_norm")(linear("per_layer_projection", p, h)(gate))


def dense_and_experts(cfg: ModelConfig, hidden: jax.Array, mlp: Callable,
                      norm: Callable[[str], Any], param_dtype: Any) -> jax.Array:
  """A Gemma 4 sparse layer's feed-forward output before `post_feedforward_layernorm` (module
  docstring); called inside the block's compact method. hidden: [batch, seq, hidden] (the
  attention residual) -> [batch, seq, hidden]."""
  dense = norm("post_feedforward_layernorm_1")(mlp(norm("pre_feedforward_layernorm")(hidden)))
  flat = hidden.reshape(-1, cfg.hidden_size)
  weights, index = route(cfg, flat, param_dtype)
  experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size, cfg.hidden_act,
                    hidden.dtype, param_dtype, cfg.moe_impl, name="experts")
  routed = experts(norm("pre_feedforward_layernorm_2")(flat), index, weights)
  return dense + norm("post_feedforward_layernorm_2")(routed.astype(hidden.dtype).reshape(
      hidden.shape))


def scale_output(hidden: jax.Array, layer_scalar: jax.Array) -> jax.Array:
  """hidden [batch, seq, hidden] times the block's learned scalar [1] (compute dtype)."""
  return hidden * layer_scalar.astype(hidden.dtype)


__all__ = ["PER_LAYER_KEYS", "dense_and_experts", "per_layer_input_residual", "per_layer_inputs", "per_layer_modules",
           "scale_output"]

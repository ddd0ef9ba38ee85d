"""Mixture-of-experts MLP blocks (Qwen3-MoE, Qwen2-MoE, Mixtral), routed dispatch.

A sparse block sends each token to ``num_experts_per_tok`` of ``num_experts`` gated MLPs and sums
their outputs weighted by the router. As MaxText's MoE does, only the chosen experts are computed:
the token copies are sorted by expert (``sort_by_expert``), each expert projection is one grouped
matmul over the sorted rows (``kernels/grouped.py``: ``jax.lax.ragged_dot`` on TPU / GPU, tiles
elsewhere), and the outputs are put back in token order and weighted (``combine``).

Parameters (per sparse layer, inside ``mlp``; Hugging Face names in families.py):

* ``gate/kernel [hidden, E]``: the router (a plain ``Linear``; kept in float by quantization).
* ``experts/{gate,up}_proj/kernel [E, hidden, I]``, ``experts/down_proj/kernel [E, I, hidden]``:
  every expert's kernel in the Flax ``[in, out]`` layout, stacked on a leading expert axis; dense,
  or one GPTQ weight per expert stacked the same way (``PackedWeight`` fields with the leading axis).
* with a shared expert (Qwen2-MoE): ``shared_expert/{gate,up,down}_proj`` (a dense MLP of width
  ``shared_expert_intermediate_size``) and ``shared_expert_gate/kernel [hidden, 1]`` (its output
  is scaled by ``sigmoid(shared_expert_gate(x))``).

Router kinds (``ModelConfig.router``, made by ``route``): "softmax_topk" (softmax of the router
logits in float32, top-k, optionally renormalized: ``norm_topk_prob``; one more function in
``ROUTE`` adds a logits-based kind) and "gemma4" (``ScaledRouter``: its own input scaling and
per-expert output scales, parameters under ``router``). ``Experts`` is independent of how tokens
were routed; Gemma 4's layers use it beside their dense MLP (models/gemma4.py).

The pipeline sees each expert projection's input through ``ExpertLinear``: ``(x_sorted,
routing)``, from which it takes one Hessian per expert over exactly the rows routed to it.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from gptq_jax.kernels.grouped import grouped_matmul
from gptq_jax.models.config import ModelConfig
from gptq_jax.models.layers import Linear, RMSNorm, mirror_existing
from gptq_jax.models.mlp import MLP, activation


@struct.dataclass
class Routing:
  """Token copies sorted by expert (rows = tokens x experts per token).

  token: [rows] int32, the token (row of the flat input) each sorted row copies.
  order: [rows] int32, the assignment (``token * k + slot``) each sorted row holds.
  group_sizes: [E] int32, rows per expert; expert e's rows are contiguous, experts in order.
  """

  token: jax.Array
  order: jax.Array
  group_sizes: jax.Array


def sort_by_expert(top_k_index: jax.Array, num_experts: int) -> Routing:
  """top_k_index: [tokens, k] -> the ``Routing`` of the tokens' copies, sorted by expert."""
  k = top_k_index.shape[1]
  flat = top_k_index.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
  return Routing(token=order // k, order=order, group_sizes=sizes)


def combine(y_sorted: jax.Array, routing: Routing, top_k_weights: jax.Array) -> jax.Array:
  """y_sorted: [rows, hidden] -> sum over each token's experts of weight x output: [tokens,
  hidden] float32."""
  tokens, k = top_k_weights.shape
  y = jnp.zeros_like(y_sorted).at[routing.order].set(y_sorted).reshape(tokens, k, -1)
  return jnp.einsum("tkh,tk->th", y.astype(jnp.float32), top_k_weights.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def softmax_topk(logits: jax.Array, top_k: int, norm_topk_prob: bool
                 ) -> tuple[jax.Array, jax.Array]:
  """logits: [tokens, E] -> (weights [tokens, k] float32, expert index [tokens, k] int32):
  softmax in float32, the k largest probabilities, renormalized to sum 1 when asked."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, index = jax.lax.top_k(probs, top_k)
  if norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, index.astype(jnp.int32)


# router kind -> (config, router logits [tokens, E]) -> (weights, index)
ROUTE: dict[str, Callable[[ModelConfig, jax.Array], tuple[jax.Array, jax.Array]]] = {
    "softmax_topk": lambda cfg, logits: softmax_topk(logits, cfg.num_experts_per_tok,
                                                     cfg.norm_topk_prob),
}


class ScaledRouter(nn.Module):
  """Gemma 4's router (kind "gemma4"): the input RMS-normed without a weight, times a learned
  ``scale [hidden]`` and ``hidden ** -0.5``, projected by ``proj`` (``[hidden, E]``) to the
  logits; softmax in float32, top-k renormalized to sum 1 (``norm_topk_prob``), each chosen
  weight times its expert's learned ``per_expert_scale [E]``.
  ``x [tokens, hidden] -> (weights [tokens, k] float32, index [tokens, k] int32)``."""

  config: ModelConfig
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    dtype, h, e = jnp.dtype(cfg.dtype), cfg.hidden_size, cfg.num_experts
    scale = self.param("scale", nn.initializers.ones, (h,), self.param_dtype)
    x = RMSNorm(h, cfg.rms_norm_eps, dtype=dtype, use_scale=False)(x)
    x = x * scale.astype(dtype) * (h ** -0.5)
    logits = Linear(h, e, dtype=dtype, param_dtype=self.param_dtype, name="proj")(x)
    weights, index = softmax_topk(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
    per_expert = self.param("per_expert_scale", nn.initializers.ones, (e,), self.param_dtype)
    return weights * per_expert.astype(jnp.float32)[index], index


def route(cfg: ModelConfig, x: jax.Array, param_dtype: Any) -> tuple[jax.Array, jax.Array]:
  """x [tokens, hidden] -> (weights [tokens, k] float32, expert index [tokens, k]) by the router
  of kind ``cfg.router``, made as a submodule of the calling module: ``gate`` (a ``Linear`` to
  the logits) or ``router`` (``ScaledRouter``)."""
  if cfg.router == "gemma4":
    return ScaledRouter(cfg, param_dtype, name="router")(x)
  logits = Linear(cfg.hidden_size, cfg.num_experts, dtype=jnp.dtype(cfg.dtype),
                  param_dtype=param_dtype, name="gate")(x)
  return ROUTE[cfg.router](cfg, logits)


class ExpertLinear(nn.Module):
  """Every expert's projection, kernel ``[E, in, out]`` (or stacked GPTQ weights), applied to the
  rows sorted by expert: ``(x [rows, in], routing) -> [rows, out]``."""

  num_experts: int
  in_features: int
  out_features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, routing: Routing) -> jax.Array:
    shape = (self.num_experts, self.in_features, self.out_features)
    kernel = self.param("kernel", mirror_existing(self, nn.initializers.normal(0.02)), shape,
                        self.param_dtype)
    return grouped_matmul(x, kernel, routing.group_sizes, dtype=self.dtype, impl=self.impl)


class Experts(nn.Module):
  """``num_experts`` gated MLPs: ``(x [tokens, hidden], top_k_index [tokens, k], top_k_weights
  [tokens, k]) -> [tokens, hidden]`` (float32), each token through its own experts only."""

  num_experts: int
  hidden_size: int
  intermediate_size: int
  hidden_act: str = "silu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, top_k_index: jax.Array, top_k_weights: jax.Array) -> jax.Array:
    routing = sort_by_expert(top_k_index, self.num_experts)
    proj = lambda name, n_in, n_out: ExpertLinear(  # noqa: E731
        self.num_experts, n_in, n_out, self.dtype, self.param_dtype, self.impl, name=name)
    h, i = self.hidden_size, self.intermediate_size
    xs = jnp.take(x.astype(self.dtype), routing.token, axis=0)  # [rows, hidden]
    gate = proj("gate_proj", h, i)(xs, routing)
    up = proj("up_proj", h, i)(xs, routing)
    y = proj("down_proj", i, h)(activation(self.hidden_act)(gate) * up, routing)
    return combine(y, routing, top_k_weights)


class SparseMoeBlock(nn.Module):
  """The MLP of a sparse layer: router ("gate") -> experts, plus an optional (gated) shared
  expert. ``x [..., hidden] -> [..., hidden]`` in the compute dtype."""

  config: ModelConfig
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    shape = x.shape
    xf = x.reshape(-1, cfg.hidden_size).astype(dtype)
    weights, index = route(cfg, xf, self.param_dtype)
    out = Experts(cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size, cfg.hidden_act,
                  dtype, self.param_dtype, cfg.moe_impl, name="experts")(xf, index, weights)
    if cfg.shared_expert_intermediate_size:
      shared = MLP(cfg, self.param_dtype, cfg.shared_expert_intermediate_size,
                   name="shared_expert")(xf)
      if cfg.shared_expert_gate:
        gate = Linear(cfg.hidden_size, 1, dtype=dtype, param_dtype=self.param_dtype,
                      name="shared_expert_gate")(xf)
        shared = jax.nn.sigmoid(gate) * shared
      out = out + shared.astype(jnp.float32)
    return out.astype(dtype).reshape(shape)

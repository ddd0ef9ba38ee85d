"""The gated MLP of every decoder block (and of a mixture-of-experts block's shared expert)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptq_jax.models.config import ModelConfig
from gptq_jax.models.layers import Linear


def activation(name: str):
  """The gated MLP's activation: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU)."""
  if name == "gelu_pytorch_tanh":
    return lambda x: jax.nn.gelu(x, approximate=True)
  return jax.nn.silu


class MLP(nn.Module):
  """Gated MLP: down(act(gate(x)) * up(x)); act is silu (SwiGLU) or tanh-GELU (Gemma's GeGLU).

  `intermediate_size` None: `config.intermediate_size` (a shared expert has its own width)."""

  config: ModelConfig
  param_dtype: Any = jnp.float32
  intermediate_size: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., hidden] -> [..., hidden]."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    width = self.intermediate_size or cfg.intermediate_size
    proj = lambda name, n_in, n_out: Linear(  # noqa: E731
        n_in, n_out, use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=self.param_dtype, name=name)
    gate = proj("gate_proj", cfg.hidden_size, width)(x)
    up = proj("up_proj", cfg.hidden_size, width)(x)
    return proj("down_proj", width, cfg.hidden_size)(activation(cfg.hidden_act)(gate) * up)

"""The decoder's building blocks with parameters: Linear (every projection), RMSNorm, Embed.

Every projection of the model goes through `Linear`, and every `Linear` through `linear_apply`:
the one place that may see a kernel that is not a dense array (a packed GPTQ weight pytree:
`PackedWeight`, `PreparedWeight` or `QuantizedWeight`, run by `gptq_jax.kernels.apply_linear` on the
backend of `ModelConfig.backend`). Nothing else reads a kernel's shape.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptq_jax.kernels.linear import apply_linear, is_quantized

HIGHEST = jax.lax.Precision.HIGHEST
Initializer = Callable[..., Any]


def _is_dense(kernel: Any) -> bool:
  return isinstance(kernel, (jax.Array, jnp.ndarray)) or hasattr(kernel, "__array__")


def linear_apply(x: jax.Array, kernel: Any, bias: jax.Array | None, dtype: Any,
                 backend: str = "auto") -> jax.Array:
  """y = x @ kernel + bias, computed in `dtype`.

  x: [..., in]; kernel: [in, out] dense, or a packed / quantized weight pytree (run with
  `backend`, one of gptq_jax.config.BACKENDS); bias: [out] or None -> y: [..., out] in `dtype`.
  """
  if is_quantized(kernel):
    return apply_linear(x, kernel, bias, dtype=dtype, backend=backend)
  y = jnp.dot(x.astype(dtype), jnp.asarray(kernel).astype(dtype), precision=HIGHEST)
  if bias is not None:
    y = y + bias.astype(dtype)
  return y


def mirror_existing(module: nn.Module, init: Initializer, name: str = "kernel") -> Initializer:
  """``init``, or, when the module's param ``name`` already holds a packed weight pytree, an init
  that mirrors its structure: flax checks an existing param's leaves against the init's abstract
  shapes, and a packed weight's are not the dense ``[in, out]``."""
  if module.has_variable("params", name):
    existing = module.get_variable("params", name)
    if not _is_dense(existing):
      return lambda *_: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), existing)
  return init


class Linear(nn.Module):
  """A projection with param "kernel" `[in, out]` (Flax layout) and optional "bias" `[out]`."""

  in_features: int
  out_features: int
  use_bias: bool = False
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = nn.initializers.normal(0.02)
  backend: str | None = None  # packed kernels; None: the enclosing module's `config.backend`

  def _backend(self) -> str:
    """`backend`, else that of the nearest enclosing module with a `config` (the Llama's)."""
    if self.backend is not None:
      return self.backend
    module = self.parent
    while isinstance(module, nn.Module):
      cfg = getattr(module, "config", None)
      if cfg is not None and hasattr(cfg, "backend"):
        return cfg.backend
      module = module.parent
    return "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", mirror_existing(self, self.kernel_init),
                        (self.in_features, self.out_features), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.out_features,), self.param_dtype)
    return linear_apply(x, kernel, bias, self.dtype, backend=self._backend())


class RMSNorm(nn.Module):
  """Root-mean-square norm with a learned scale "weight" `[dim]`; statistics in float32.

  Normalizes over the last axis, so it also serves as a per-head norm (q/k norms on
  `[..., heads, head_dim]`). `unit_offset` (Gemma 3): scale by `1 + weight` in float32 and cast the
  product; `float_scale` (Gemma 4): scale by `weight` in float32 and cast the product; otherwise
  (Llama, Qwen) cast the normalized input to the activation dtype and scale by `weight` there, as
  Hugging Face does for each. `use_scale=False`: no weight at all (Gemma 4's value norm).
  """

  dim: int
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  unit_offset: bool = False
  float_scale: bool = False
  use_scale: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    if not self.use_scale:
      return xf.astype(self.dtype)
    init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
    weight = self.param("weight", init, (self.dim,), self.param_dtype)
    if self.unit_offset:
      return (xf * (1.0 + weight.astype(jnp.float32))).astype(self.dtype)
    if self.float_scale:
      return (xf * weight.astype(jnp.float32)).astype(self.dtype)
    return (weight.astype(self.dtype) * xf.astype(self.dtype)).astype(self.dtype)


class Embed(nn.Module):
  """Token embedding "embedding" `[vocab, hidden]`; `attend` is the tied output projection."""

  num_embeddings: int
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.embedding = self.param("embedding", nn.initializers.normal(0.02),
                                (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, input_ids: jax.Array, scale: float | None = None) -> jax.Array:
    """input_ids: [batch, seq] int -> [batch, seq, hidden] in `dtype` (times `scale`, rounded to
    `dtype` first, when given: Gemma's sqrt(hidden))."""
    out = jnp.take(self.embedding, input_ids, axis=0).astype(self.dtype)
    if scale is not None:
      out = out * jnp.asarray(scale, self.dtype)
    return out

  def attend(self, x: jax.Array) -> jax.Array:
    """x: [..., hidden] -> [..., vocab] logits in `dtype`."""
    return jnp.dot(x.astype(self.dtype), self.embedding.T.astype(self.dtype), precision=HIGHEST)

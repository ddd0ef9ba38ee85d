"""Rotary position embeddings (RoFormer), with `rope_theta` and Llama 3 / linear frequency scaling.

Conventions follow Hugging Face Llama: the head dimension is split in two halves (not interleaved),
`rotate_half(x) = concat(-x2, x1)`, angles computed in float32.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from gptq_jax.models.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies `[head_dim // 2]` float32, scaled as `cfg.rope_scaling` says."""
  dim = cfg.head_dim
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
  scaling = cfg.rope_scaling
  if scaling is None:
    return inv_freq
  if scaling.rope_type == "linear":
    return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
  # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
  old_len = scaling.original_max_position_embeddings
  low_freq_wavelen = old_len / scaling.low_freq_factor
  high_freq_wavelen = old_len / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old_len / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(cfg: ModelConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """positions: [batch, seq] int -> (cos, sin), each [batch, seq, head_dim] float32."""
  inv_freq = jnp.asarray(inv_frequencies(cfg))  # [head_dim // 2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim // 2]
  angles = jnp.concatenate([angles, angles], axis=-1)  # [batch, seq, head_dim]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """x: [batch, seq, heads, head_dim]; cos, sin: [batch, seq, head_dim] -> rotated x (x's dtype)."""
  half = x.shape[-1] // 2
  xf = x.astype(jnp.float32)
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)

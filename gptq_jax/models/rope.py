"""Rotary position embeddings (RoFormer) per layer type, with llama3 / linear / yarn /
proportional scaling.

Conventions follow Hugging Face: the head dimension is split in two halves (not interleaved),
`rotate_half(x) = concat(-x2, x1)`, angles computed in float32. A layer's base and scaling come
from `cfg.rope(layer_type)` (Gemma 3's sliding layers have their own base), its head size from
`cfg.layer_head_dim(layer_type)` (Gemma 4's full layers have their own); yarn also scales cos and
sin by its attention factor; proportional leaves the pairs past its partial factor unrotated
(frequency 0: cos 1, sin 0).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from gptq_jax.models.config import FULL, ModelConfig, RopeScaling


def _yarn(inv_freq_base: np.ndarray, pos_freqs: np.ndarray, dim: int, theta: float,
          s: RopeScaling) -> np.ndarray:
  """YaRN (NTK-by-parts): interpolated frequencies below the correction range, original ones above,
  a linear ramp in between (transformers' formula)."""

  def correction_dim(rotations: float) -> float:
    return (dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
        2 * math.log(theta))

  low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
  if s.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # no zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation = (1 - ramp).astype(np.float32)
  interpolation = (1.0 / (np.float32(s.factor) * pos_freqs)).astype(np.float32)
  return (interpolation * (1 - extrapolation) + inv_freq_base * extrapolation).astype(np.float32)


def attention_factor(scaling: RopeScaling | None) -> float:
  """The factor on cos and sin (1 except for yarn)."""
  if scaling is None or scaling.rope_type != "yarn":
    return 1.0
  if scaling.attention_factor is not None:
    return float(scaling.attention_factor)

  def mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  if scaling.mscale and scaling.mscale_all_dim:
    return float(mscale(scaling.factor, scaling.mscale) / mscale(scaling.factor, scaling.mscale_all_dim))
  return mscale(scaling.factor)


def inv_frequencies(cfg: ModelConfig, layer_type: str = FULL) -> np.ndarray:
  """Inverse frequencies `[head_dim // 2]` float32 of a layer type, scaled as its rope says."""
  theta, scaling = cfg.rope(layer_type)
  dim = cfg.layer_head_dim(layer_type)
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  pos_freqs = (np.float32(theta) ** exponents).astype(np.float32)
  inv_freq = (1.0 / pos_freqs).astype(np.float32)
  if scaling is None:
    return inv_freq
  if scaling.rope_type == "proportional":  # the first `rotated` pairs turn, the rest stay put
    rotated = int(scaling.partial_rotary_factor * dim // 2)
    inv_freq = np.where(np.arange(dim // 2) < rotated, inv_freq, np.float32(0))
    return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
  if scaling.rope_type == "linear":
    return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
  if scaling.rope_type == "yarn":
    return _yarn(inv_freq, pos_freqs, dim, theta, scaling)
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


def rope_cos_sin(cfg: ModelConfig, positions: jnp.ndarray, layer_type: str = FULL
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """positions: [batch, seq] int -> (cos, sin), each [batch, seq, head_dim] float32 (head_dim
  of this layer type)."""
  inv_freq = jnp.asarray(inv_frequencies(cfg, layer_type))  # [head_dim // 2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim // 2]
  angles = jnp.concatenate([angles, angles], axis=-1)  # [batch, seq, head_dim]
  factor = attention_factor(cfg.rope(layer_type)[1])
  if factor != 1.0:
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """x: [batch, seq, heads, head_dim]; cos, sin: [batch, seq, head_dim] -> rotated x (x's dtype)."""
  half = x.shape[-1] // 2
  xf = x.astype(jnp.float32)
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)

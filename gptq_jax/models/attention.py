"""Grouped-query self-attention with rotary embeddings, causal (optionally sliding-window) +
padding masks, optional per-head q/k norms, and a KV cache.

Without a cache, queries and keys are the same `seq` tokens. With a cache, keys are the cache's
`max_len` slots: the new tokens are written at slots `cache_index .. cache_index + seq - 1`, and a
query at slot q sees every valid slot s <= q (and, on a sliding layer with window w, only
q - w < s: the window counts slots, as Hugging Face's mask does). `attention_mask` is `[batch, seq]` (1 = real token)
without a cache and `[batch, max_len]` (valid slots, the new ones included) with one.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptq_jax.models.config import FULL, ModelConfig
from gptq_jax.models.layers import HIGHEST, Linear, RMSNorm
from gptq_jax.models.rope import apply_rope, rope_cos_sin

KVCache = dict[str, jax.Array]  # {"k": [batch, kv_heads, max_len, head_dim], "v": same}
_MASKED = -1e30  # finite, so a fully padded query row stays finite (uniform), never NaN
_MIN_CHUNK, _MAX_CHUNKS = 128, 4  # causal chunking of long queries (compile time vs work)


def attention_weights_mask(key_valid: jax.Array, query_slots: jax.Array,
                           window: int | None = None) -> jax.Array:
  """key_valid: [batch, keys] (1 = attendable); query_slots: [seq] -> allowed [batch, seq, keys].

  window: keys at most `window - 1` slots before the query (None: all earlier keys)."""
  key_slots = jnp.arange(key_valid.shape[-1])
  causal = key_slots[None, :] <= query_slots[:, None]  # [seq, keys]
  if window is not None:
    causal = causal & (key_slots[None, :] > query_slots[:, None] - window)
  return causal[None] & (key_valid[:, None, :] != 0)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array,
                          scale: float | None = None, softcap: float | None = None) -> jax.Array:
  """q: [b, t, heads, d]; k, v: [b, kv_heads, s, d]; allowed: [b, t, s] -> [b, t, heads, d].

  Query heads are grouped over key/value heads (GQA) without repeating k and v; scores and the
  softmax are float32. scale: the factor on q.k (None: d ** -0.5); softcap: scores become
  softcap * tanh(scores / softcap) before masking.
  """
  b, t, heads, d = q.shape
  kv_heads, s = k.shape[1], k.shape[2]
  groups = heads // kv_heads
  q = q.reshape(b, t, kv_heads, groups, d).transpose(0, 2, 3, 1, 4)  # [b, kv, groups, t, d]
  q = q.reshape(b, kv_heads, groups * t, d)
  scores = jnp.einsum("bkmd,bksd->bkms", q, k, precision=HIGHEST,
                      preferred_element_type=jnp.float32) * (d ** -0.5 if scale is None else scale)
  if softcap is not None:
    scores = jnp.tanh(scores / softcap) * softcap
  scores = scores.reshape(b, kv_heads, groups, t, s)  # [b, kv, groups, t, s]
  scores = jnp.where(allowed[:, None, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv_heads, groups * t, s)
  out = jnp.einsum("bkms,bksd->bkmd", probs, v, precision=HIGHEST)  # [b, kv, groups*t, d]
  return out.reshape(b, kv_heads, groups, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, heads, d)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array,
                     scale: float | None = None, softcap: float | None = None) -> jax.Array:
  """`dot_product_attention` when query i sits at key slot i (no cache, or a prefill at slot 0).

  Queries go in at most `_MAX_CHUNKS` chunks of at least `_MIN_CHUNK`; a chunk ending at slot c
  reads only keys [0, c), skipping up to 3/8 of the causal-masked work (static shapes, same
  result). More chunks save more work but cost compile time (30 layers x chunks).
  """
  t = q.shape[1]
  chunk = max(_MIN_CHUNK, -(-t // _MAX_CHUNKS))
  outs = []
  for c0 in range(0, t, chunk):
    c1 = min(t, c0 + chunk)
    outs.append(dot_product_attention(q[:, c0:c1], k[:, :, :c1], v[:, :, :c1],
                                      allowed[:, c0:c1, :c1], scale, softcap))
  return jnp.concatenate(outs, axis=1)


class Attention(nn.Module):
  """Self-attention: q/k/v/o projections (separate `Linear`s), optional q/k norms, RoPE, GQA.

  `layer_type` ("full_attention" / "sliding_attention") picks the window, the RoPE base and (Gemma
  4) the head size and key/value heads. `kv_shared` (Gemma 4): the layer has no k/v projections
  and attends over another layer's keys and values, passed as `shared_kv`."""

  config: ModelConfig
  param_dtype: Any = jnp.float32
  layer_type: str = FULL
  kv_shared: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, attention_mask: jax.Array,
               kv_cache: KVCache | None = None, cache_index: jax.Array | int = 0,
               shared_kv: KVCache | None = None, return_kv: bool = False):
    """x: [batch, seq, hidden]; positions: [batch, seq] -> [batch, seq, hidden].

    With `kv_cache` or `return_kv` -> (out, kv): this layer's keys / values in cache layout
    `{"k", "v"}: [batch, kv_heads, keys, head_dim]` (the updated cache when `kv_cache` is given;
    None for a `kv_shared` layer). `shared_kv`: the producer's keys / values in that layout (its
    updated cache when caching), over the same keys as `attention_mask`.
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    heads = cfg.num_attention_heads
    kv_heads, hd = cfg.layer_kv_heads(self.layer_type), cfg.layer_head_dim(self.layer_type)
    proj = lambda name, n_in, n_out, bias: Linear(  # noqa: E731
        n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=self.param_dtype, name=name)
    norm = lambda name, scale=True: RMSNorm(  # noqa: E731
        hd, cfg.rms_norm_eps, dtype=dtype, param_dtype=self.param_dtype,
        unit_offset=cfg.norm_unit_offset, float_scale=cfg.norm_float_scale, use_scale=scale,
        name=name)
    b, t, _ = x.shape
    q = proj("q_proj", cfg.hidden_size, heads * hd, cfg.qkv_bias)(x).reshape(b, t, heads, hd)
    if cfg.qk_norm:  # per head, over head_dim, before RoPE
      q = norm("q_norm")(q)
    cos, sin = rope_cos_sin(cfg, positions, self.layer_type)
    q = apply_rope(q, cos, sin)

    new_cache = None
    if self.kv_shared:
      if shared_kv is None:
        raise ValueError("a K/V-sharing layer (Gemma 4 num_kv_shared_layers) needs shared_kv: "
                         "the keys / values of its producer layer")
      k, v = shared_kv["k"].astype(dtype), shared_kv["v"].astype(dtype)
    else:
      k = proj("k_proj", cfg.hidden_size, kv_heads * hd, cfg.qkv_bias)(x).reshape(b, t, kv_heads, hd)
      v = k  # Gemma 4's attention_k_eq_v: the values are the keys' projection
      if cfg.layer_has_v_proj(self.layer_type):
        v = proj("v_proj", cfg.hidden_size, kv_heads * hd, cfg.qkv_bias)(x).reshape(
            b, t, kv_heads, hd)
      if cfg.qk_norm:
        k = norm("k_norm")(k)
      if cfg.value_norm:
        v = norm("v_norm", scale=False)(v)
      k = apply_rope(k, cos, sin)
      k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv_heads, t, hd]
      new_cache = {"k": k, "v": v}
      if kv_cache is not None:
        start = (0, 0, cache_index, 0)
        k_all = jax.lax.dynamic_update_slice(kv_cache["k"], k.astype(kv_cache["k"].dtype), start)
        v_all = jax.lax.dynamic_update_slice(kv_cache["v"], v.astype(kv_cache["v"].dtype), start)
        new_cache = {"k": k_all, "v": v_all}
        k, v = k_all.astype(dtype), v_all.astype(dtype)
    allowed = attention_weights_mask(attention_mask, jnp.arange(t) + cache_index,
                                     cfg.window(self.layer_type))  # [b, t, keys]
    scale, softcap = cfg.attention_scale, cfg.attn_logit_softcapping
    if isinstance(cache_index, int) and cache_index == 0:  # query i at key slot i
      out = causal_attention(q, k, v, allowed, scale, softcap)
    else:
      out = dot_product_attention(q, k, v, allowed, scale, softcap)
    out = out.reshape(b, t, heads * hd)
    out = proj("o_proj", heads * hd, cfg.hidden_size, cfg.o_bias)(out)
    return out if kv_cache is None and not return_kv else (out, new_cache)


def layer_cache_shape(cfg: ModelConfig, layer_type: str, batch: int, max_len: int
                      ) -> tuple[int, int, int, int]:
  """`[batch, kv_heads, max_len, head_dim]` of a layer of this type's cache."""
  return (batch, cfg.layer_kv_heads(layer_type), max_len, cfg.layer_head_dim(layer_type))


def init_kv_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None
                  ) -> list[KVCache | None]:
  """Zeroed per-layer caches `{"k", "v"}: [batch, kv_heads, max_len, head_dim]` (compute dtype);
  None for a layer that reads another layer's keys / values (Gemma 4's shared K/V)."""
  dtype = jnp.dtype(cfg.dtype) if dtype is None else dtype
  out: list[KVCache | None] = []
  for i, layer_type in enumerate(cfg.layer_types):
    shape = layer_cache_shape(cfg, layer_type, batch, max_len)
    out.append(None if cfg.kv_shared(i) else
               {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)})
  return out

"""Next-token selection for generation: greedy, temperature, top-k, top-p (seeded), and EOS rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def select_tokens(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None,
                  top_p: float | None) -> jax.Array:
  """logits: [b, vocab] float32 -> next tokens [b] int32 (argmax when temperature == 0)."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None and top_k < logits.shape[-1]:
    kth = lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # keep the smallest prefix whose mass reaches top_p (the most likely token always)
    n_keep = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, jnp.maximum(n_keep - 1, 0), axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def finish_rows(token: jax.Array, done: jax.Array, eos: jax.Array, pad: jax.Array):
  """Rows already done emit ``pad``; a row is done once it has emitted an EOS id (``eos`` [n])."""
  token = jnp.where(done, pad, token)
  if eos.shape[0]:
    done = done | jnp.any(token[:, None] == eos[None, :], axis=-1)
  return token, done


def prompt_positions(cache_mask: jax.Array, p: int) -> jax.Array:
  """Positions [b, p] of a left-padded prompt: 0.. over its real tokens (padding at 0)."""
  return jnp.maximum(jnp.cumsum(cache_mask[:, :p], axis=-1) - 1, 0)

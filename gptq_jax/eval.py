"""Perplexity over non-overlapping windows, and generation (greedy / sampled) with a KV cache.

Both take any params pytree the decoder accepts (any family) (dense or, later, packed GPTQ weights).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptq_jax.models import ModelConfig, forward, forward_with_cache, init_kv_cache

Params = dict[str, Any]


@functools.partial(jax.jit, static_argnums=(1,))
def _window_nll(params: Params, cfg: ModelConfig, windows: jax.Array) -> jax.Array:
  """windows: [b, seqlen] -> summed NLL of tokens 1..seqlen-1 of each window, [b] float32."""
  logits = forward(params, cfg, windows)[:, :-1]  # [b, seqlen - 1, vocab]
  logp = jax.nn.log_softmax(logits, axis=-1)
  target = jnp.take_along_axis(logp, windows[:, 1:, None], axis=-1)[..., 0]
  return -jnp.sum(target, axis=-1)


def window_nll(params: Params, cfg: ModelConfig, tokens: Any, *, seqlen: int,
               max_windows: int | None = None, batch_size: int = 1) -> tuple[float, int, int]:
  """(total NLL, scored tokens, windows) over non-overlapping `seqlen` windows of `tokens` [n]."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens must be a 1-D int array, got {tokens.dtype} {tokens.shape}")
  if seqlen < 2:
    raise ValueError(f"seqlen={seqlen} is invalid: expected >= 2")
  if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
    raise ValueError(f"token ids must be in [0, {cfg.vocab_size})")
  n_windows = tokens.shape[0] // seqlen
  if max_windows is not None:
    n_windows = min(n_windows, max_windows)
  if n_windows == 0:
    raise ValueError(f"{tokens.shape[0]} tokens make no full window of seqlen={seqlen}")
  windows = tokens[:n_windows * seqlen].reshape(n_windows, seqlen).astype(np.int32)
  total = 0.0
  for start in range(0, n_windows, batch_size):
    batch = windows[start:start + batch_size]
    real = batch.shape[0]
    if real < batch_size:  # pad the last batch: one compiled shape
      batch = np.concatenate([batch, np.zeros((batch_size - real, seqlen), np.int32)])
    total += float(np.sum(np.asarray(_window_nll(params, cfg, jnp.asarray(batch)))[:real],
                          dtype=np.float64))
  return total, n_windows * (seqlen - 1), n_windows


def perplexity(params: Params, cfg: ModelConfig, tokens: Any, *, seqlen: int,
               max_windows: int | None = None, batch_size: int = 1) -> float:
  """exp(mean NLL) over non-overlapping windows of a 1-D token array, each scored on its own
  (positions 1..seqlen-1, as Hugging Face's fixed-length perplexity with stride = seqlen)."""
  nll, count, _ = window_nll(params, cfg, tokens, seqlen=seqlen, max_windows=max_windows,
                             batch_size=batch_size)
  return math.exp(nll / count)


# ----- generation -----

def _select(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None,
            top_p: float | None) -> jax.Array:
  """logits: [b, vocab] float32 -> next tokens [b] int32 (argmax when temperature == 0)."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always)
    n_keep = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, jnp.maximum(n_keep - 1, 0), axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(1, 6, 7, 8), donate_argnums=(3,))
def _prefill(params, cfg, prompt, cache, cache_mask, key, temperature, top_k, top_p):
  """prompt: [b, p] (left-padded) written at slots 0..p-1 -> (next token [b], cache)."""
  positions = jnp.maximum(jnp.cumsum(cache_mask[:, :prompt.shape[1]], axis=-1) - 1, 0)
  logits, cache = forward_with_cache(params, cfg, prompt, cache, 0, cache_mask, positions,
                                     last_only=True)
  return _select(logits[:, -1], key, temperature, top_k, top_p), cache


@functools.partial(jax.jit, static_argnums=(1, 8, 9, 10), donate_argnums=(3,))
def _decode_step(params, cfg, token, cache, cache_mask, slot, position, key, temperature, top_k,
                 top_p):
  """token: [b] written at `slot` (traced: one compile for all steps) -> (next token [b], cache)."""
  logits, cache = forward_with_cache(params, cfg, token[:, None], cache, slot, cache_mask,
                                     position[:, None])
  return _select(logits[:, -1], key, temperature, top_k, top_p), cache


@functools.partial(jax.jit, static_argnums=(1, 6, 7, 8))
def _full_step(params, cfg, buffer, mask, slot, key, temperature, top_k, top_p):
  """No cache: the whole fixed-size buffer [b, L] re-run; the token after `slot - 1` is chosen."""
  logits = forward(params, cfg, buffer, mask)  # positions from the mask
  last = jax.lax.dynamic_index_in_dim(logits, slot - 1, axis=1, keepdims=False)
  return _select(last, key, temperature, top_k, top_p)


def generate(params: Params, cfg: ModelConfig, prompt_ids: Any, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, use_cache: bool = True, attention_mask: Any = None) -> np.ndarray:
  """Prompt `[p]` or left-padded `[b, p]` (+ mask) -> prompt and new tokens `[.., p + new]`.

  temperature 0 is greedy; otherwise sampling with optional top_k / top_p, keyed by `seed`.
  With `use_cache` a fixed-size KV cache and one jitted decode step serve every token.
  """
  prompt = np.asarray(prompt_ids, dtype=np.int32)
  squeeze = prompt.ndim == 1
  prompt = prompt[None] if squeeze else prompt
  b, p = prompt.shape
  mask = np.ones((b, p), np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
  if mask.shape != prompt.shape:
    raise ValueError(f"attention_mask {mask.shape} does not match prompt_ids {prompt.shape}")
  if max_new_tokens <= 0:
    return prompt[0] if squeeze else prompt
  total = p + max_new_tokens
  temperature, top_k = float(temperature), (int(top_k) if top_k else None)
  top_p = float(top_p) if top_p is not None and top_p < 1.0 else None
  sampling = (temperature, top_k, top_p)
  key = jax.random.key(seed)
  full_mask = np.concatenate([mask, np.ones((b, max_new_tokens), np.int32)], axis=1)
  new = []
  if use_cache:
    cache = init_kv_cache(cfg, b, total)
    full_mask_j = jnp.asarray(full_mask)
    token, cache = _prefill(params, cfg, jnp.asarray(prompt), cache, full_mask_j,
                            jax.random.fold_in(key, 0), *sampling)
    position = jnp.asarray(mask.sum(axis=1), jnp.int32)  # next position per sequence
    new.append(token)
    for step in range(1, max_new_tokens):
      token, cache = _decode_step(params, cfg, token, cache, full_mask_j, jnp.int32(p + step - 1),
                                  position, jax.random.fold_in(key, step), *sampling)
      position = position + 1
      new.append(token)
  else:
    buffer = np.concatenate([prompt, np.zeros((b, max_new_tokens), np.int32)], axis=1)
    buffer = jnp.asarray(buffer)
    for step in range(max_new_tokens):
      slot = p + step
      step_mask = jnp.asarray(full_mask * (np.arange(total) < slot))
      token = _full_step(params, cfg, buffer, step_mask, jnp.int32(slot),
                         jax.random.fold_in(key, step), *sampling)
      buffer = buffer.at[:, slot].set(token)
      new.append(token)
  out = np.concatenate([prompt, np.stack([np.asarray(t) for t in new], axis=1)], axis=1)
  return out[0] if squeeze else out

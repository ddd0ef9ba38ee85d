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

from gptq_jax.models import ModelConfig, forward
from gptq_jax.models.decode import generate as fast_generate, select_tokens

Params = dict[str, Any]


@functools.partial(jax.jit, static_argnums=(1,))
def _window_nll(params: Params, cfg: ModelConfig, windows: jax.Array) -> jax.Array:
  """windows: [b, seqlen] -> summed NLL of tokens 1..seqlen-1 of each window, [b] float32."""
  logits = forward(params, cfg, windows)[:, :-1]  # [b, seqlen - 1, vocab]
  logp = jax.nn.log_softmax(logits, axis=-1)
  target = jnp.take_along_axis(logp, windows[:, 1:, None], axis=-1)[..., 0]
  return -jnp.sum(target, axis=-1)


def window_nll(params: Params, cfg: ModelConfig, tokens: Any, *, seqlen: int,
               max_windows: int | None = None, batch_size: int = 1,
               bos_token_id: int | None = None) -> tuple[float, int, int]:
  """(total NLL, scored tokens, windows) over non-overlapping `seqlen` windows of `tokens` [n].

  With `bos_token_id` (Gemma: `gptq_jax.data.bos_token_id(tokenizer)`), each window is that token
  followed by the next `seqlen - 1` tokens, all of them scored; a leading one in `tokens` is dropped.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens must be a 1-D int array, got {tokens.dtype} {tokens.shape}")
  if seqlen < 2:
    raise ValueError(f"seqlen={seqlen} is invalid: expected >= 2")
  if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
    raise ValueError(f"token ids must be in [0, {cfg.vocab_size})")
  step = seqlen
  if bos_token_id is not None:
    if not 0 <= bos_token_id < cfg.vocab_size:
      raise ValueError(f"bos_token_id={bos_token_id} is not in [0, {cfg.vocab_size})")
    tokens = tokens[1:] if tokens.size and tokens[0] == bos_token_id else tokens
    step = seqlen - 1
  n_windows = tokens.shape[0] // step
  if max_windows is not None:
    n_windows = min(n_windows, max_windows)
  if n_windows == 0:
    raise ValueError(f"{tokens.shape[0]} tokens make no full window of seqlen={seqlen}")
  windows = tokens[:n_windows * step].reshape(n_windows, step).astype(np.int32)
  if bos_token_id is not None:
    windows = np.concatenate([np.full((n_windows, 1), bos_token_id, np.int32), windows], axis=1)
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
               max_windows: int | None = None, batch_size: int = 1,
               bos_token_id: int | None = None) -> float:
  """exp(mean NLL) over non-overlapping windows of a 1-D token array, each scored on its own
  (positions 1..seqlen-1, as Hugging Face's fixed-length perplexity with stride = seqlen); with
  `bos_token_id`, every window starts with it (see `window_nll`)."""
  nll, count, _ = window_nll(params, cfg, tokens, seqlen=seqlen, max_windows=max_windows,
                             batch_size=batch_size, bos_token_id=bos_token_id)
  return math.exp(nll / count)


# ----- generation -----

@functools.partial(jax.jit, static_argnums=(1, 6, 7, 8))
def _full_step(params, cfg, buffer, mask, slot, key, temperature, top_k, top_p):
  """No cache: the whole fixed-size buffer [b, L] re-run; the token after `slot - 1` is chosen."""
  logits = forward(params, cfg, buffer, mask)  # positions from the mask
  last = jax.lax.dynamic_index_in_dim(logits, slot - 1, axis=1, keepdims=False)
  return select_tokens(last, key, temperature, top_k, top_p)


def generate(params: Params, cfg: ModelConfig, prompt_ids: Any, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, use_cache: bool = True, attention_mask: Any = None) -> np.ndarray:
  """Prompt `[p]` or left-padded `[b, p]` (+ mask) -> prompt and new tokens `[.., p + new]`.

  temperature 0 is greedy; otherwise sampling with optional top_k / top_p, keyed by `seed`.
  With `use_cache` (the fast path) this is `gptq_jax.models.decode.generate` (stacked layers, one
  compiled prefill and one compiled decode step, no stop at EOS here); without, every step re-runs
  the whole sequence (the reference the fast path is tested against).
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
  if use_cache:  # the compiled path: stacked layers, one prefill and one decode step
    res = fast_generate(params, cfg, prompt, attention_mask=mask, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                        stop_at_eos=False)
    out = np.concatenate([prompt, res.tokens], axis=1)
    return out[0] if squeeze else out
  total = p + max_new_tokens
  temperature, top_k = float(temperature), (int(top_k) if top_k else None)
  top_p = float(top_p) if top_p is not None and top_p < 1.0 else None
  sampling = (temperature, top_k, top_p)
  key = jax.random.key(seed)
  full_mask = np.concatenate([mask, np.ones((b, max_new_tokens), np.int32)], axis=1)
  new = []
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

"""The per-layer path of generation: one compiled program per layer kind, called once per layer.

``lax.scan`` over stacked layers (decode.py) keeps one compiled program for the whole model, but
on XLA:CPU each step copies its slice of the stacked weights before the dots read it: for dense
float32 weights that doubles the bytes moved per token, and decoding is bound by them. Here each
layer's parameters stay separate arrays, read in place: the embedding, every decoder layer and the
head are jitted functions called from Python (asynchronously dispatched). Programs are keyed by
the layer's kind and parameter structure, so their number does not grow with depth or tokens,
and layers of different structures (per-module bit widths, GPTQModel's ``dynamic``) simply get
their own program. Each layer's cache ``{"k", "v"}: [batch, kv_heads, max_len, head_dim]`` is
donated to its call and updated in place.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from gptq_jax.models import model as _model
from gptq_jax.models.sampling import finish_rows, prompt_positions, select_tokens


def layer_module(cfg, kind):
  """The DecoderLayer of a layer kind (a ``LayerKind``, a layer type string, or None)."""
  return _model.decoder_layer(cfg, kind)


@functools.partial(jax.jit, static_argnums=(0,))
def embed_prompt(cfg, rest, prompt, cache_mask):
  """prompt [b, p] -> (hidden [b, p, h], positions [b, p])."""
  return _model.embed(rest, cfg, prompt), prompt_positions(cache_mask, prompt.shape[1])


@functools.partial(jax.jit, static_argnums=(0,))
def embed_token(cfg, rest, token):
  """token [b] -> hidden [b, 1, h]."""
  return _model.embed(rest, cfg, token[:, None])


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def prefill_layer(cfg, layer_type, lp, cache, hidden, positions, cache_mask):
  """One layer over the prompt, written at cache slots 0..p-1 -> (hidden, cache)."""
  return layer_module(cfg, layer_type).apply({"params": lp}, hidden, positions, cache_mask, cache,
                                             0)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def decode_layer(cfg, layer_type, lp, cache, hidden, position, cache_mask, slot):
  """One layer over one token per row, written at ``slot`` -> (hidden, cache)."""
  return layer_module(cfg, layer_type).apply({"params": lp}, hidden, position[:, None],
                                             cache_mask, cache, slot)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def prefill_head(cfg, rest, hidden, key, temperature, top_k, top_p, eos, pad):
  """The prompt's last position -> (token [b], done [b], logits [b, V])."""
  logits = _model.final_logits(rest, cfg, hidden[:, -1:])[:, -1]
  token = select_tokens(logits, key, temperature, top_k, top_p)
  token, done = finish_rows(token, jnp.zeros(token.shape, bool), eos, pad)
  return token, done, logits


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def decode_head(cfg, rest, hidden, done, key, temperature, top_k, top_p, eos, pad):
  """hidden [b, 1, h] -> (next token [b], done [b])."""
  logits = _model.final_logits(rest, cfg, hidden)[:, -1]
  token = select_tokens(logits, key, temperature, top_k, top_p)
  return finish_rows(token, done, eos, pad)


def prefill(cfg, rest, layers, layer_types, caches, prompt, cache_mask, key, sampling, eos, pad):
  """Like decode.prefill, layer by layer -> (token, done, caches, logits)."""
  hidden, positions = embed_prompt(cfg, rest, prompt, cache_mask)
  new = []
  for lp, t, c in zip(layers, layer_types, caches):
    hidden, c = prefill_layer(cfg, t, lp, c, hidden, positions, cache_mask)
    new.append(c)
  token, done, logits = prefill_head(cfg, rest, hidden, key, *sampling, eos, pad)
  return token, done, new, logits


def decode(cfg, rest, layers, layer_types, caches, token, done, cache_mask, slot, position, key,
           sampling, eos, pad):
  """Like decode.decode_step, layer by layer -> (next, done, caches)."""
  hidden = embed_token(cfg, rest, token)
  new = []
  for lp, t, c in zip(layers, layer_types, caches):
    hidden, c = decode_layer(cfg, t, lp, c, hidden, position, cache_mask, slot)
    new.append(c)
  token, done = decode_head(cfg, rest, hidden, done, key, *sampling, eos, pad)
  return token, done, new


def compiled_count() -> int:
  """Programs compiled so far by this path (this process)."""
  return sum(f._cache_size() for f in (embed_prompt, embed_token, prefill_layer, decode_layer,
                                       prefill_head, decode_head))


def init_caches(cfg, batch: int, max_len: int) -> list[dict[str, Any]]:
  shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
  dtype = jnp.dtype(cfg.dtype)
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
          for _ in range(cfg.num_hidden_layers)]

"""The per-layer path of generation: one compiled program per layer kind, called once per layer.

``lax.scan`` over stacked layers (decode.py) keeps one compiled program for the whole model, but
on XLA:CPU each step copies its slice of the stacked weights before the dots read it: for dense
float32 weights that doubles the bytes moved per token, and decoding is bound by them. Here each
layer's parameters stay separate arrays, read in place: the embedding, every decoder layer and the
head are jitted functions called from Python (asynchronously dispatched). Programs are keyed by
the layer's kind and parameter structure, so their number does not grow with depth or tokens,
and layers of different structures (per-module bit widths, GPTQModel's ``dynamic``) simply get
their own program. Each layer's cache ``{"k", "v"}: [batch, kv_heads, max_len, head_dim]`` is
donated to its call and updated in place. Gemma 4 runs here only: its layers differ in shape by
type, read their own slice of the per-layer inputs, and its K/V-sharing layers (no cache of their
own) attend over the cache their producer wrote in the same step.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from gptq_jax.models import model as _model
from gptq_jax.models.attention import init_kv_cache
from gptq_jax.models.sampling import finish_rows, prompt_positions, select_tokens


def layer_module(cfg, kind):
  """The DecoderLayer of a layer kind (a ``LayerKind``, a layer type string, or None)."""
  return _model.decoder_layer(cfg, kind)


def _embed(cfg, rest, ids):
  """ids [b, t] -> (hidden [b, t, h], per-layer inputs [b, t, layers, P] or None)."""
  if getattr(cfg, "hidden_size_per_layer_input", 0):
    return _model.embed_inputs(rest, cfg, ids)
  return _model.embed(rest, cfg, ids), None


@functools.partial(jax.jit, static_argnums=(0,))
def embed_prompt(cfg, rest, prompt, cache_mask):
  """prompt [b, p] -> (hidden [b, p, h], positions [b, p], per-layer inputs or None)."""
  hidden, per_layer = _embed(cfg, rest, prompt)
  return hidden, prompt_positions(cache_mask, prompt.shape[1]), per_layer


@functools.partial(jax.jit, static_argnums=(0,))
def embed_token(cfg, rest, token):
  """token [b] -> (hidden [b, 1, h], per-layer inputs or None)."""
  return _embed(cfg, rest, token[:, None])


def _apply(cfg, kind, lp, cache, hidden, positions, cache_mask, index, extra):
  """One layer at cache slot ``index`` -> (hidden, its new cache; None for a K/V-sharing layer,
  which reads its producer's updated cache ``extra["shared_kv"]`` and writes none)."""
  module = layer_module(cfg, kind)
  if getattr(kind, "kv_shared", False):
    return module.apply({"params": lp}, hidden, positions, cache_mask, None, index, **extra), None
  return module.apply({"params": lp}, hidden, positions, cache_mask, cache, index, **extra)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def prefill_layer(cfg, kind, lp, cache, hidden, positions, cache_mask, extra):
  """One layer over the prompt, written at cache slots 0..p-1 -> (hidden, cache). ``kind``:
  the layer's ``LayerKind``; ``extra``: Gemma 4's per_layer_input / shared_kv (or empty)."""
  return _apply(cfg, kind, lp, cache, hidden, positions, cache_mask, 0, extra)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def decode_layer(cfg, kind, lp, cache, hidden, position, cache_mask, slot, extra):
  """One layer over one token per row, written at ``slot`` -> (hidden, cache)."""
  return _apply(cfg, kind, lp, cache, hidden, position[:, None], cache_mask, slot, extra)


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


def _run(cfg, layers, layer_types, caches, hidden, per_layer, step):
  """Every layer in turn; ``step(kind, lp, cache, hidden, extra)`` runs one -> (hidden, caches).
  Gemma 4: each layer gets its slice of the per-layer inputs, and a K/V-sharing layer the cache
  its producer has just written."""
  new = []
  producer = getattr(cfg, "kv_producer", lambda i: None)
  for i, (lp, kind, c) in enumerate(zip(layers, layer_types, caches)):
    extra = {}
    if per_layer is not None:
      extra["per_layer_input"] = per_layer[:, :, i]
    if producer(i) is not None:
      extra["shared_kv"] = new[producer(i)]
    hidden, c = step(kind, lp, c, hidden, extra)
    new.append(c)
  return hidden, new


def prefill(cfg, rest, layers, layer_types, caches, prompt, cache_mask, key, sampling, eos, pad):
  """Like decode.prefill, layer by layer -> (token, done, caches, logits)."""
  hidden, positions, per_layer = embed_prompt(cfg, rest, prompt, cache_mask)
  hidden, new = _run(cfg, layers, layer_types, caches, hidden, per_layer,
                     lambda kind, lp, c, h, extra: prefill_layer(cfg, kind, lp, c, h, positions,
                                                                 cache_mask, extra))
  token, done, logits = prefill_head(cfg, rest, hidden, key, *sampling, eos, pad)
  return token, done, new, logits


def decode(cfg, rest, layers, layer_types, caches, token, done, cache_mask, slot, position, key,
           sampling, eos, pad):
  """Like decode.decode_step, layer by layer -> (next, done, caches)."""
  hidden, per_layer = embed_token(cfg, rest, token)
  hidden, new = _run(cfg, layers, layer_types, caches, hidden, per_layer,
                     lambda kind, lp, c, h, extra: decode_layer(cfg, kind, lp, c, h, position,
                                                                cache_mask, slot, extra))
  token, done = decode_head(cfg, rest, hidden, done, key, *sampling, eos, pad)
  return token, done, new


def compiled_count() -> int:
  """Programs compiled so far by this path (this process)."""
  return sum(f._cache_size() for f in (embed_prompt, embed_token, prefill_layer, decode_layer,
                                       prefill_head, decode_head))


def init_caches(cfg, batch: int, max_len: int) -> list[dict[str, Any] | None]:
  """One zeroed ``{"k", "v"}`` per layer (its type's shape; None for a K/V-sharing layer)."""
  return init_kv_cache(cfg, batch, max_len)

"""The CLI's streamed path: weights stay on the host, one block at a time goes to the devices.

``ModelSource`` (``cli/source.py``) reads one decoder block, or a slice of the embedding or of the
output projection, on demand (rotated on read with ``--rotation``). ``StreamedRun`` is the
``DecoderAdapter`` the driver quantizes through: ``get_block(i)`` reads block ``i`` from the
source, ``set_block(i, q)`` hands the quantized block to the run's sink and keeps nothing (the
driver's ``on_block_done`` saves it for resume at once; the outputs are assembled from those
saves, ``cli/output.py``). The windows are embedded from ``embedding_table``: only the rows of
the tokens they use (``embed_rows`` maps the token ids into it). With ``--lm-head`` the driver
quantizes the output projection a slice of the vocabulary at a time (``lm_head_slices``).

When perplexity is wanted, two ``EvalStream``s ride along: the held-out windows carried through
each float block as it is read (before) and through each quantized block as it is done (after),
so the before / after perplexity needs no second pass over the weights and never the whole model
on a device. ``streamed_nll`` then applies the final norm and the output projection a slice of
the vocabulary at a time (a running log-sum-exp): the logits ``[windows, seqlen, vocab]`` are
never held, nor the whole output projection.
"""

from __future__ import annotations

import functools
import gc
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gptq_jax.cli import source as source_lib
from gptq_jax.models import hf as hf_lib
from gptq_jax.pipeline.adapter import ModelAdapter, block_adapter
from gptq_jax.pipeline.capture import ctx_advancer_for, runner_for

DTYPES = ("bfloat16", "float32")
ModelSource, source_digest = source_lib.ModelSource, source_lib.source_digest  # the old home


# ----- perplexity through the blocks, one at a time ---------------------------------------------

def embedding_table(rows: np.ndarray, token_ids: np.ndarray, dtype: Any) -> dict:
  """The params the windows are embedded from: the embedding's rows of ``token_ids`` (sorted,
  unique; ``ModelSource.embedding_rows``) and the ids themselves, on the device."""
  return {"embed_tokens": {"embedding": source_lib.to_device(rows, dtype),
                           "token_ids": jnp.asarray(token_ids, jnp.int32)}}


def used_tokens(*arrays: Any) -> np.ndarray:
  """The sorted distinct token ids of ``arrays``, with 0 (what padded calibration rows hold)."""
  return np.unique(np.concatenate([np.zeros(1, np.int64)] +
                                  [np.asarray(a, np.int64).reshape(-1) for a in arrays]))


def embed_rows(adapter, params, input_ids, attention_mask):
  """``adapter.embed`` for params from ``embedding_table`` (the ids mapped to their row; traced
  ids are fine), or for a whole embedding."""
  table = params["embed_tokens"]
  if "token_ids" not in table:
    return ModelAdapter.embed(adapter, params, input_ids, attention_mask)
  ids = table["token_ids"]
  rows = ModelAdapter.for_config(adapter.config.replace(vocab_size=ids.shape[0]))
  return rows.embed({"embed_tokens": {"embedding": table["embedding"]}},
                    jnp.clip(jnp.searchsorted(ids, input_ids), 0, ids.shape[0] - 1),
                    attention_mask)


@functools.partial(jax.jit, static_argnums=1)
def _slice_update(head_params, cfg, hidden, windows, lo, carry):
  """The running log-sum-exp over the vocabulary slice ``[lo, lo + cfg.vocab_size)`` and the
  targets' logits that fall in it (hidden ``[b, seqlen, h]`` after the last block)."""
  from gptq_jax.models import final_logits

  logits = final_logits(head_params, cfg, hidden)[:, :-1].astype(jnp.float32)  # [b, t-1, n]
  top, total, picked = carry
  new_top = jnp.maximum(top, jnp.max(logits, axis=-1))
  total = total * jnp.exp(top - new_top) + jnp.sum(jnp.exp(logits - new_top[..., None]), axis=-1)
  local = windows[:, 1:] - lo
  inside = (local >= 0) & (local < logits.shape[-1])
  at = jnp.take_along_axis(logits, jnp.clip(local, 0, logits.shape[-1] - 1)[..., None], -1)[..., 0]
  return new_top, total, jnp.where(inside, at, picked)


@jax.jit
def _window_nll(carry):
  top, total, picked = carry
  return jnp.sum(jnp.log(total) + top - picked, axis=-1)  # [b]


def streamed_nll(streams: list, heads: list, norm: dict, cfg, chunks, progress=None) -> list:
  """Perplexity of each ``EvalStream`` from its hidden states, the output projection applied a
  slice of the vocabulary at a time: ``heads[k](lo, hi)`` is stream k's kernel columns
  ``lo:hi`` (dense ``[hidden, hi - lo]`` or packed); each distinct head is read once per slice.
  ``progress(k)`` is called after slice k."""
  carries = [[(jnp.full(w.shape[:1] + (w.shape[1] - 1,), -jnp.inf, jnp.float32),
               jnp.zeros((w.shape[0], w.shape[1] - 1), jnp.float32),
               jnp.zeros((w.shape[0], w.shape[1] - 1), jnp.float32)) for w in st.windows]
             for st in streams]
  for k, (lo, hi) in enumerate(chunks):
    kernels: dict = {}
    slice_cfg = cfg.replace(vocab_size=hi - lo, tie_word_embeddings=False)
    for st, head, carry in zip(streams, heads, carries):
      if id(head) not in kernels:
        kernels[id(head)] = {"norm": norm, "lm_head": {"kernel": head(lo, hi)}}
      params = kernels[id(head)]
      for j, ((h, _), w) in enumerate(zip(st.state, st.windows)):
        carry[j] = _slice_update(params, slice_cfg, h, jnp.asarray(w), jnp.int32(lo), carry[j])
    jax.block_until_ready(carries)
    del kernels
    if progress is not None:
      progress(k)
  out = []
  for st, carry in zip(streams, carries):
    nll = sum(float(np.sum(np.asarray(_window_nll(c)), dtype=np.float64)) for c in carry)
    tokens = sum(w.shape[0] * (w.shape[1] - 1) for w in st.windows)
    out.append(math.exp(nll / tokens))
  return out


class EvalStream:
  """Non-overlapping ``seqlen`` windows of held-out tokens, carried block by block."""

  def __init__(self, adapter, embed_params, windows: np.ndarray, batch: int = 1):
    self.windows = [windows[s:s + batch] for s in range(0, len(windows), batch)]
    self.state = []
    for w in self.windows:
      ids = jnp.asarray(w)
      self.state.append(embed_rows(adapter, embed_params, ids, jnp.ones_like(ids)))
    self.at = 0  # blocks applied so far

  def advance(self, run, block_params, advance_ctx=None) -> None:
    """Carry the windows through one block; ``advance_ctx`` (``capture.ctx_advancer_for``, None
    for most models) gives the next block's context (Gemma 4)."""
    self.state = [(run(block_params, h, ctx),
                   ctx if advance_ctx is None else advance_ctx(block_params, h, ctx))
                  for h, ctx in self.state]
    self.at += 1


def eval_windows(tokens: np.ndarray, seqlen: int, max_windows: int,
                 bos_token_id: int | None = None) -> np.ndarray:
  """``[n, seqlen]`` non-overlapping windows; with ``bos_token_id`` each is that token followed by
  ``seqlen - 1`` text tokens (as ``eval.window_nll`` cuts them)."""
  if bos_token_id is not None:
    tokens = np.asarray(tokens, np.int32)
    tokens = tokens[1:] if tokens.size and tokens[0] == bos_token_id else tokens
    body = eval_windows(tokens, seqlen - 1, max_windows)
    return np.concatenate([np.full((len(body), 1), bos_token_id, np.int32), body], axis=1)
  n = min(len(tokens) // seqlen, max_windows)
  if n == 0:
    raise ValueError(f"the evaluation text has {len(tokens)} tokens: no full window of "
                     f"--seqlen {seqlen}")
  return np.asarray(tokens[:n * seqlen], np.int32).reshape(n, seqlen)


# ----- the adapter the driver quantizes through -------------------------------------------------

def trim_heap() -> None:
  """glibc's ``malloc_trim(0)``: return the free pages inside the heap to the system (freed
  blocks' buffers otherwise stay resident, fragmented between live allocations). No-op
  elsewhere."""
  gc.collect()  # buffers held by reference cycles (found measuring: ~200 MiB after a block)
  try:
    import ctypes  # noqa: PLC0415

    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


_FROZEN: list[bool] = [False]  # freeze_heap froze, thaw_heap has not thawed


def freeze_heap() -> None:
  """``gc.freeze()`` after a collection: what is alive now (the imported modules, transformers'
  and torch's among them, the tokenizer) is left out of later collections, so each
  ``trim_heap`` scans only what the run made since (its ``gc.collect()`` took 0.15 s with
  400k objects alive, once per block). The CLI's ``run`` thaws them when it ends
  (``thaw_heap``): a caller's process collects them again. A process that froze objects itself
  is left as it is."""
  if gc.get_freeze_count() == 0:
    gc.collect()
    gc.freeze()
    _FROZEN[0] = True


def thaw_heap() -> None:
  """Undo ``freeze_heap`` (nothing when it froze nothing)."""
  if _FROZEN[0]:
    gc.unfreeze()
    _FROZEN[0] = False


Sink = Callable[[int, Any], None]


class StreamedRun(ModelAdapter):
  """The driver's view of a model on disk (see the module docstring).

  ``done``: blocks already quantized by an interrupted run (``i -> packed block``), returned as
  they are; ``evals``: ``(before, after)`` ``EvalStream``s or None.
  """

  def __init__(self, source: ModelSource, config, dtype: Any, sink: Sink,
               done: dict[int, Any] | None = None, evals: tuple | None = None):
    super().__init__(config)
    self.source, self.dtype, self.sink = source, dtype, sink
    self.done = done or {}
    self.evals = evals
    self.release_embedding = True
    self.rotation = source.rotation  # applied on read (check_rotated asks)
    # --lm-head: the output projection a slice of the vocabulary at a time (dynamic.py)
    self.lm_head_slices = (source.vocab_chunks(),
                           lambda lo, hi: source.head_slice(lo, hi, dtype))
    self.blocks_read = []  # the indices read from the source, in order (tests, the breakdown)
    # seconds spent carrying the evaluation windows inside get_block and inside set_block
    self.eval_seconds = {"get": 0.0, "set": 0.0}

  def _advance(self, stream, block, i: int, where: str) -> None:
    t0 = time.perf_counter()
    # block i's own kind (sliding / full attention): one compiled runner per layer type
    stream.advance(runner_for(block_adapter(self, i), None, "data"), block,
                   ctx_advancer_for(self, i, None, "data"))
    jax.block_until_ready(stream.state)
    self.eval_seconds[where] += time.perf_counter() - t0

  def embed(self, params, input_ids, attention_mask):
    return embed_rows(self, params, input_ids, attention_mask)

  def __hash__(self):  # the driver caches compiled steps per adapter
    return id(self)

  def __eq__(self, other):
    return self is other

  def _dense(self, block):
    """The quantized block dequantized in the compute dtype (what the after-stream runs)."""
    quantized = lambda x: hasattr(x, "dequantize")
    return jax.tree.map(lambda x: x.dequantize(self.dtype) if quantized(x) else x, block,
                        is_leaf=quantized)

  def get_block(self, params, i):
    trim_heap()  # the previous block's buffers are free: give their pages back first
    if self.release_embedding:
      # The calibration and evaluation windows are embedded once, before block 0: the embedding
      # (and Gemma 4's per-layer input tables) are not needed on the devices after that (the
      # driver's params are this dict).
      for key in hf_lib.embedding_keys(self.config):
        params.pop(key, None)
    before = self.evals[0] if self.evals else None
    need_float = i not in self.done or (before is not None and before.at == i)
    block = None
    if need_float:
      block = self.source.block(i, self.dtype)
      self.blocks_read.append(i)
      if before is not None and before.at == i:  # once, even if refinement reads it again
        self._advance(before, block, i, "get")
    if i in self.done:
      q = self.done[i]
      if self.evals is not None and self.evals[1].at == i:
        self._advance(self.evals[1], self._dense(q), i, "get")
      return q
    return block

  def get_float_block(self, params, i):
    """Block ``i``'s float weights, also for a block already quantized (a resumed GPTAQ run
    carries the float model's stream through it)."""
    del params
    return self.source.block(i, self.dtype)

  def set_block(self, params, i, block_params):
    if self.evals is not None and self.evals[1].at == i:
      self._advance(self.evals[1], self._dense(block_params), i, "set")
    self.sink(i, block_params)
    return params

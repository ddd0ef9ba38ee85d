"""Calibration batches: accept the forms users have, hand the driver uniform micro-batches.

Accepted: a 2-D int array ``[nsamples, seqlen]``; a list of such arrays (or 1-D sequences); a list
of dicts with ``"input_ids"`` and optionally ``"attention_mask"`` (what ``gptq_jax.data`` and
Hugging Face tokenizers produce); a list of ``(input_ids, attention_mask)`` tuples. Samples of
different lengths are right-padded with masked tokens. Everything is restacked into micro-batches
of a fixed size (a multiple of the data-parallel device count; the last one padded with fully
masked rows, which add nothing to any Hessian).
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple

import numpy as np


class CalibBatch(NamedTuple):
  input_ids: np.ndarray  # [batch, seq] int32
  attention_mask: np.ndarray  # [batch, seq] int32, 1 = real token


def _as_pair(item: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
  if isinstance(item, dict):
    if "input_ids" not in item:
      raise ValueError(f"calibration batch {k} is a dict without 'input_ids' (keys: "
                       f"{sorted(item)})")
    ids, mask = item["input_ids"], item.get("attention_mask")
  elif isinstance(item, tuple) and len(item) == 2:
    ids, mask = item
  else:
    ids, mask = item, None
  ids = np.asarray(ids)
  if ids.ndim == 1:
    ids = ids[None]
  if ids.ndim != 2 or ids.size == 0:
    raise ValueError(f"calibration batch {k} must be token ids [batch, seq], got shape "
                     f"{ids.shape}")
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"calibration batch {k} must hold integer token ids, got dtype {ids.dtype}")
  mask = np.ones(ids.shape, np.int32) if mask is None else np.asarray(mask).reshape(ids.shape)
  return ids.astype(np.int32), (mask != 0).astype(np.int32)


def normalize(calib_batches: Any) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
  """-> (one ``(ids [seq], mask [seq])`` pair per calibration sample, the largest batch given)."""
  if calib_batches is None:
    raise ValueError("calib_batches is None: pass token ids [nsamples, seqlen], a list of "
                     "{'input_ids', 'attention_mask'} dicts, or gptq_jax.data.get_calib_batches()")
  if isinstance(calib_batches, np.ndarray) or hasattr(calib_batches, "__array__") and not \
      isinstance(calib_batches, (list, tuple, dict)):
    items: Iterable[Any] = [np.asarray(calib_batches)]
  elif isinstance(calib_batches, dict):
    items = [calib_batches]
  else:
    items = list(calib_batches)
  samples, largest = [], 1
  for k, item in enumerate(items):
    ids, mask = _as_pair(item, k)
    samples.extend(zip(ids, mask))
    largest = max(largest, len(ids))
  samples = [(i, m) for i, m in samples if m.any()]
  if not samples:
    raise ValueError("calib_batches holds no calibration token (empty, or every token masked)")
  return samples, largest


def micro_batches(samples: list[tuple[np.ndarray, np.ndarray]], batch_size: int,
                  multiple: int = 1) -> list[CalibBatch]:
  """Stack samples into ``[batch_size', seq]`` batches, batch_size' rounded up to ``multiple``."""
  size = -(-max(1, batch_size) // multiple) * multiple
  seq = max(len(i) for i, _ in samples)
  out = []
  for start in range(0, len(samples), size):
    chunk = samples[start:start + size]
    ids = np.zeros((size, seq), np.int32)
    mask = np.zeros((size, seq), np.int32)
    for r, (i, m) in enumerate(chunk):
      ids[r, :len(i)], mask[r, :len(m)] = i, m
    out.append(CalibBatch(ids, mask))
  return out


def check_vocab(samples, vocab_size: int | None) -> None:
  lo = min(int(i.min()) for i, _ in samples)
  hi = max(int(i.max()) for i, _ in samples)
  if lo < 0 or (vocab_size is not None and hi >= vocab_size):
    raise ValueError(f"calibration token ids span [{lo}, {hi}], outside the model's vocabulary "
                     f"[0, {vocab_size}): was the data tokenized for another model?")


def sample_ids(batches: list[CalibBatch], offset: int = 0) -> list[np.ndarray]:
  """Each row's calibration sample index, ``[batch]`` int32 per micro-batch: ``offset`` plus its
  place among the real rows (rows with a token), in order; -1 for padding rows. Under
  ``jax.distributed``, ``offset`` is the number of samples of the processes before this one, so
  the indices are those one process holding every sample gives them."""
  out, k = [], offset
  for b in batches:
    real = b.attention_mask.any(axis=1)
    ids = np.full(real.shape, -1, np.int32)
    ids[real] = np.arange(k, k + int(real.sum()), dtype=np.int32)
    k += int(real.sum())
    out.append(ids)
  return out

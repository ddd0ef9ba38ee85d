"""Prompt batches for generation: token lists left-padded into one array, length buckets."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def round_up(a: int, b: int) -> int:
  """``a`` rounded up to a multiple of ``b`` (prompt and cache length buckets)."""
  return -(-a // b) * b


def left_pad(prompts: Sequence[Sequence[int]], length: int | None = None, pad: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> (ids [b, length], mask [b, length]) right-aligned (left-padded)."""
  length = max(len(p) for p in prompts) if length is None else length
  ids = np.full((len(prompts), length), pad, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for r, p in enumerate(prompts):
    if len(p):
      ids[r, length - len(p):], mask[r, length - len(p):] = np.asarray(p, np.int32), 1
  return ids, mask

"""Which calibration rows block refinement trains on and which it holds out, per device.

Refinement (``refine.py``) runs data-parallel over the data axis the Hessians use: each device
keeps the calibration rows it already holds. Rows are named by their calibration sample index
(``calib.sample_ids``: the same index on one device or many, -1 for padding rows), so:

* **Held out**: the samples whose index is ``7 mod 8`` (one in eight, spread over the devices
  as the samples are), or the last sample when there are fewer than 8; with a single sample it is
  used for both training and the check. Only real rows are ever held out or trained on: a padding
  row (a micro-batch's fill) is never picked.
* **Training**: every other real sample. Each device draws its ``per_device`` rows of a step from
  its own training rows, by a seeded permutation (``seed``, the block, the device's place on the
  data axis), cycled; ``per_device = ceil(refine_batch / devices)``, so a step trains on
  ``devices * per_device`` samples in all (``refine_batch`` on one device).

The plan is host data, the same on every process: ``[devices, ...]`` index arrays into each
device's rows (its micro-batch rows in order, micro-batch after micro-batch), padded to the
largest device's count with slots whose ``valid`` is 0 (they add nothing).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

HELD_EVERY = 8


class RowPlan(NamedTuple):
  train: np.ndarray  # [devices, T] int32 indices into a device's rows
  train_valid: np.ndarray  # [devices, T] float32, 1 = a real training row
  held: np.ndarray  # [devices, H] int32
  held_valid: np.ndarray  # [devices, H] float32
  order: np.ndarray  # [devices, steps, per_device] int32 indices into the train slots


def held_out(ids: np.ndarray, n_real: int) -> np.ndarray:
  """Which of the sample indices ``ids`` are held out (see the module docstring)."""
  if n_real >= HELD_EVERY:
    return (ids >= 0) & (ids % HELD_EVERY == HELD_EVERY - 1)
  return ids == n_real - 1


def _pad(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
  width = max(1, max(len(r) for r in rows))
  idx = np.zeros((len(rows), width), np.int32)
  valid = np.zeros((len(rows), width), np.float32)
  for d, r in enumerate(rows):
    idx[d, :len(r)], valid[d, :len(r)] = r, 1.0
  return idx, valid


def _order(n: int, steps: int, per: int, seed: tuple[int, ...]) -> np.ndarray:
  """``[steps, per]`` indices in ``[0, n)``: seeded permutations of them, one after another."""
  if n == 0:
    return np.zeros((steps, per), np.int32)
  rng = np.random.default_rng(seed)
  need = steps * per
  perms = [rng.permutation(n) for _ in range(-(-need // n))]
  return np.concatenate(perms)[:need].reshape(steps, per).astype(np.int32)


def plan(ids: list[np.ndarray], devices: int, *, steps: int, batch: int, seed: int,
         block: int) -> RowPlan:
  """``ids``: each micro-batch's global ``[rows]`` sample indices (-1 = padding), rows laid out
  over the ``devices`` of the data axis in equal contiguous parts."""
  rows = [(k, r, int(v)) for k, b in enumerate(ids) for r, v in enumerate(b)]
  n_real = sum(v >= 0 for _, _, v in rows)
  if n_real == 0:
    raise ValueError("block refinement has no calibration sample to train on: every row is "
                     "padding")
  per_row = ids[0].shape[0] // devices
  train: list[list[int]] = [[] for _ in range(devices)]
  held: list[list[int]] = [[] for _ in range(devices)]
  for k, r, v in rows:
    if v < 0:
      continue
    d, local = r // per_row, k * per_row + r % per_row
    is_held = bool(held_out(np.asarray([v]), n_real)[0])
    if is_held:
      held[d].append(local)
    if not is_held or n_real == 1:
      train[d].append(local)
  train_idx, train_valid = _pad(train)
  held_idx, held_valid = _pad(held)
  per = min(-(-max(1, batch) // devices), train_idx.shape[1])
  order = np.stack([_order(len(train[d]), steps, per, (seed, block, d))
                    for d in range(devices)])
  return RowPlan(train_idx, train_valid, held_idx, held_valid, order)

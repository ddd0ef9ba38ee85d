"""Calibration batches under ``jax.distributed``: each process feeds its own share of the samples.

With several processes the data-axis mesh spans every process's devices. Each process passes only
its local micro-batches ``[local_batch, seq]``; ``put_batch`` assembles them into one global array
``[local_batch * processes, seq]`` sharded over the data axis
(``jax.make_array_from_process_local_data``), and the ``shard_map`` + ``psum`` Hessians then sum
over every process's tokens. All processes must run the same number of equally shaped steps, so
``agree_batches`` pads every process's micro-batches to the largest shape and count (padding rows
are fully masked: they add nothing to any Hessian). Everything else (the solver, the block
weights) is computed identically on every process.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptq_jax.pipeline.calib import CalibBatch


def agree_batches(batches: list[CalibBatch]) -> list[CalibBatch]:
  """The same number of ``[batch, seq]`` micro-batches on every process (a no-op with one)."""
  if jax.process_count() == 1:
    return batches
  local = np.array([len(batches), *batches[0].input_ids.shape], np.int64)
  n, b, t = (int(v) for v in multihost_utils.process_allgather(local).max(axis=0))
  out = []
  for k in range(n):
    ids, mask = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    if k < len(batches):
      src = batches[k]
      ids[:src.input_ids.shape[0], :src.input_ids.shape[1]] = src.input_ids
      mask[:src.attention_mask.shape[0], :src.attention_mask.shape[1]] = src.attention_mask
    out.append(CalibBatch(ids, mask))
  return out


def put_batch(mesh: Mesh | None, axis_name: str, local: np.ndarray) -> jax.Array:
  """This process's rows ``[local_batch, ...]`` -> the global array sharded over ``axis_name``."""
  if mesh is None:
    return jnp.asarray(local)
  sharding = NamedSharding(mesh, P(axis_name))
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  return jax.make_array_from_process_local_data(sharding, local)


def replicate(mesh: Mesh, tree):
  """Every array of ``tree`` replicated over ``mesh``. With several processes each process holds
  the same values (the driver computes them identically), so each local device gets a copy of
  the local array: no cross-host transfer and no collective."""
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x  # already a global array
    x = jnp.asarray(x)
    return jax.make_array_from_single_device_arrays(
        x.shape, sharding, [jax.device_put(x, d) for d in sharding.addressable_devices])

  return jax.tree.map(one, tree)

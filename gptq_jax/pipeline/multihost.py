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

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptq_jax.core import hessian
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


def sample_offset(n_local: int) -> int:
  """How many calibration samples the processes before this one hold (0 with one process)."""
  if jax.process_count() == 1:
    return 0
  counts = multihost_utils.process_allgather(np.int64(n_local))
  return int(np.sum(np.asarray(counts)[:jax.process_index()]))


def host_value(x: jax.Array) -> np.ndarray:
  """The whole value of a (possibly multi-process) global array, on every process's host."""
  if jax.process_count() == 1 or x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def per_device_put(mesh: Mesh, axis_name: str, tree):
  """Host arrays ``[devices on axis_name, ...]`` (the same on every process) as global arrays
  whose entry ``d`` lives on the devices at place ``d`` of the data axis."""
  sharding = NamedSharding(mesh, P(axis_name))
  return jax.tree.map(
      lambda a: jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx]), tree)


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


# ----- sums kept per device (the Hessians: core/hessian.py) -------------------------------------
# Each device adds its own samples to its own compensated sums; the sums are combined once, when
# they are read (``combined``), not at every micro-batch: fewer collectives, and the result does
# not depend on how the samples were spread (core/hessian.py).


def per_device_zeros(mesh: Mesh, axis_name: str, tree):
  """Zeros shaped like ``tree``'s arrays with a leading ``[devices on axis_name]`` axis, sharded
  over it: one copy per device of the data axis (a global array on every process)."""
  n = mesh.shape[axis_name]
  specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct((n,) + tuple(a.shape), a.dtype), tree)
  make = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), specs),
                 out_shardings=NamedSharding(mesh, P(axis_name)))
  return make()


def own(tree):
  """Inside ``shard_map``: this device's entry of a per-device tree (drop the leading axis)."""
  return jax.tree.map(lambda a: a[0], tree)


def stacked(tree):
  """Inside ``shard_map``: a device's tree with the leading per-device axis again."""
  return jax.tree.map(lambda a: a[None], tree)


@functools.lru_cache(maxsize=16)
def _combiner(mesh: Mesh, axis_name: str):
  return jax.jit(jax.shard_map(lambda st: hessian.psum_state(own(st), axis_name), mesh=mesh,
                               in_specs=P(axis_name), out_specs=P()))


def combined(mesh: Mesh | None, axis_name: str, state):
  """A per-device ``HessianState`` / ``CrossState`` summed over the data axis (replicated); with
  no mesh, ``state`` itself."""
  return state if mesh is None else _combiner(mesh, axis_name)(state)

"""How a run lays its arrays out on a slice: the settings, the meshes, the shardings, the
micro-batches and the ``ShapeDtypeStruct`` trees of one block (no weights anywhere).

Mirrors the driver: every chip on one ``"data"`` axis (``resolve_mesh("auto")``; no mesh with one
chip), micro-batches of ``B`` samples (the CLI's ``--batch-size``, at least one per chip, rounded
up to a multiple of the chips), the solves on process 0's first device with their rows spread over
process 0's devices (``core.shared.solve_mesh("auto")``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from gptq_jax.config import GPTQConfig
from gptq_jax.models.config import ModelConfig
from gptq_jax.models.families import layer_expert_specs, layer_tensor_specs
from gptq_jax.pipeline.adapter import ModelAdapter
from gptq_jax.plan.slices import Slice

S = jax.ShapeDtypeStruct


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSettings:
  """What a run is asked to do (the quantize CLI's flags that shape its programs)."""

  model: ModelConfig  # its ``dtype`` is the run's --dtype
  cfg: GPTQConfig
  nsamples: int
  seqlen: int
  batch_size: int | None = None
  eval_windows: int = 0
  stash_bytes: int | None = None  # --stash-mb; None: half of a chip's free HBM

  def __post_init__(self):
    for name in ("nsamples", "seqlen"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name}={getattr(self, name)} is invalid: expected an integer >= 1")
    if self.batch_size is not None and self.batch_size < 1:
      raise ValueError(f"--batch-size={self.batch_size} is invalid: expected an integer >= 1")


class Layout:
  def __init__(self, run: RunSettings, sl: Slice):
    self.run, self.slice, self.model, self.cfg = run, sl, run.model, run.cfg
    self.dtype = jnp.dtype(run.model.dtype)
    n = sl.chips
    self.mesh = jax.make_mesh((n,), ("data",), devices=sl.devices) if n > 1 else None
    self.home = SingleDeviceSharding(sl.local[0])
    self.replicated = NamedSharding(self.mesh, P()) if self.mesh is not None else self.home
    self.data = NamedSharding(self.mesh, P("data")) if self.mesh is not None else self.home
    local = sl.local
    self.slice_is_tpu = local[0].platform == "tpu"  # compiling for a TPU slice (plan/solves.py)
    self.spread = (Mesh(np.array(local), ("rows",))
                   if len(local) > 1 and local[0].platform != "cpu" else None)
    self.batch = -(-max(run.batch_size or 1, n) // n) * n
    self.nbatches = math.ceil(run.nsamples / self.batch)
    self.seqlen = run.seqlen

  def adapter(self, kind=None):
    """The driver's adapter of a block of ``kind`` (a ``LayerKind``; None: the model's one)."""
    return ModelAdapter.for_config(self.model, kind)

  def groups(self, adapter) -> tuple:
    if self.cfg.true_sequential:
      return adapter.sequential_groups
    return (tuple(p for g in adapter.sequential_groups for p in g),)

  def layer_index(self, kind=None) -> int:
    return 0 if kind is None else self.model.layer_kinds.index(kind)

  def block(self, kind, sharding, dtype=None) -> dict:
    """One block's parameters (Flax layout; a sparse block's experts stacked ``[E, in, out]``)
    as structs on ``sharding``."""
    dtype = dtype or self.dtype
    out: dict = {}
    i = self.layer_index(kind)
    experts = [(e.path, None, (len(e.names),) + tuple(e.shape[::-1]))
               for e in layer_expert_specs(self.model, i)]
    for path, _, shape in list(layer_tensor_specs(self.model, i)) + experts:
      shape = tuple(shape[::-1]) if path[-1] == "kernel" and len(shape) == 2 else tuple(shape)
      node = out
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = S(shape, dtype, sharding=sharding)
    return out

  def stream_batch(self, rows: int | None = None, length: int | None = None, sharding=None):
    """(hidden [B, T, H], ctx, mask [B, T]) of one micro-batch, split over the data axis."""
    b, t = rows or self.batch, length or self.seqlen
    sh = sharding or self.data
    hidden = S((b, t, self.model.hidden_size), self.dtype, sharding=sh)
    ctx = {"positions": S((b, t), jnp.int32, sharding=sh),
           "attention_mask": S((b, t), jnp.int32, sharding=sh)}
    return hidden, ctx, S((b, t), jnp.int32, sharding=sh)

  def on_data(self, tree):
    return jax.tree.map(lambda s: S(s.shape, s.dtype, sharding=self.data), tree)

  def on_home(self, tree):
    return jax.tree.map(lambda s: S(s.shape, s.dtype, sharding=self.home), tree)

"""Block refinement's programs (``pipeline/refine.py``), compiled with the run's shapes.

``refine._compiled(adapter, st)`` gives the four jitted functions a block's refinement calls: the
training loop (one call: every step, the held-out checks and the best-step choice), the float
block's run for the targets (on chunks of 8 samples), the per-layer measure on the held-out
prefixes, and the final codes. Refinement gathers the calibration stream on the home device; its
arguments are laid out as ``refine_block`` lays them out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptq_jax.pipeline import refine
from gptq_jax.pipeline.adapter import get_path
from gptq_jax.plan.layout import Layout
from gptq_jax.plan.measure import Program, measure, nbytes

S = jax.ShapeDtypeStruct


def _frozen_and_theta(lay: Layout, block: dict, st) -> tuple[dict, dict]:
  f32, home = jnp.float32, lay.home
  frozen, theta = {}, {}
  for p in st.paths:
    k, n = get_path(block, p)["kernel"].shape
    groups = 1 if lay.cfg.group_size == -1 else -(-k // lay.cfg.group_size)
    frozen[p] = {"codes": S((k, n), f32, sharding=home), "scales": S((groups, n), f32, sharding=home),
                 "zeros": S((groups, n), f32, sharding=home),
                 "g_idx": S((k,), jnp.int32, sharding=home), "w": S((k, n), f32, sharding=home),
                 "onehot": S((k, groups), f32, sharding=home)}
    theta[p] = {"log_scale": S((groups, n), f32, sharding=home)}
    if st.rounding:
      theta[p]["v"] = S((k, n), f32, sharding=home)
  return frozen, theta


def programs(lay: Layout, layer_type: str | None) -> tuple[list[Program], int]:
  """(refinement's programs for one block, bytes it gathers on the home device beside them)."""
  cfg = lay.cfg
  adapter = lay.adapter(layer_type)
  paths = tuple(p for g in adapter.sequential_groups for p in g)
  st = refine._Static(paths, 2**cfg.bits - 1, int(cfg.refine_steps), float(cfg.refine_lr),
                      bool(cfg.refine_rounding))
  train, evaluate, run, final = refine._compiled(adapter, st)
  block = lay.block(layer_type, lay.home)
  frozen, theta = _frozen_and_theta(lay, block, st)
  n, seq = lay.nbatches * lay.batch, lay.seqlen
  n_held = max(1, n // 8)
  n_train = n - n_held if n > 1 else 1
  batch = min(int(cfg.refine_batch), n_train)
  length = min(int(cfg.refine_seqlen) or seq, seq)

  def sample_set(rows: int, t: int):
    h, c, m = lay.stream_batch(rows, t, lay.home)
    return h, c, S(m.shape, jnp.float32, sharding=lay.home), h

  train_set, held_set = sample_set(n_train, length), sample_set(n_held, seq)
  order = S((st.steps, batch), jnp.int32, sharding=lay.home)
  progs = [measure("refinement: training loop", "refinement", train,
                   (theta, frozen, block, *train_set, order, held_set))]
  for rows, t, what in ((min(8, n_train), length, "training"), (min(8, n_held), seq, "held-out")):
    h, c, _ = lay.stream_batch(rows, t, lay.home)
    chunks = -(-(n_train if what == "training" else n_held) // 8)
    progs.append(measure(f"refinement: float targets ({what})", "refinement", run, (block, h, c),
                         calls=chunks))
  held_prefix = sample_set(n_held, length)
  progs.append(measure("refinement: per-layer measure", "refinement", evaluate,
                       (theta, frozen, block, *held_prefix), calls=2))
  progs.append(measure("refinement: final codes", "refinement", final, (theta, frozen)))
  # the stream gathered on the home device (refine_stream), its cut copies and targets
  h_all, c_all, m_all = lay.stream_batch(n, seq, lay.home)
  gathered = nbytes([h_all, c_all, m_all]) + nbytes(train_set) + nbytes(held_set)
  return progs, gathered

"""Block refinement's programs (``pipeline/refine.py``), compiled with the run's shapes.

``refine_loop.compiled(adapter, static, mesh, "data")`` gives the four jitted functions a block's
refinement calls, data-parallel over the chips as the Hessians are: ``prepare`` (each chip's
training and held-out rows gathered from the micro-batches it holds, with the float block's
outputs on them), ``train`` (the whole loop with its held-out checks, one call), ``evaluate`` (the
block error and each linear's on the held-out prefixes: before and after, two calls) and
``final`` (the codes and scales of the trained parameters, on the home chip). The row plan is
``refine_rows.plan`` of the run's sample indices; its arrays, the rows and the training sets are
laid out per chip as ``refine._refine`` lays them out, the float block and the frozen quantized
parameters replicated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gptq_jax.pipeline import refine_loop, refine_rows
from gptq_jax.pipeline.adapter import get_path
from gptq_jax.pipeline.experts import float_by_default
from gptq_jax.plan.layout import Layout
from gptq_jax.plan.measure import Program, measure, nbytes

S = jax.ShapeDtypeStruct


def _frozen(lay: Layout, block: dict, paths, sharding) -> dict:
  """``refine_loop.frozen_of`` of each quantized linear, as structs."""
  f32 = jnp.float32
  out = {}
  for p in paths:
    k, n = get_path(block, p)["kernel"].shape
    groups = 1 if lay.cfg.group_size == -1 else -(-k // lay.cfg.group_size)
    shapes = {"codes": (k, n), "scales": (groups, n), "zeros": (groups, n), "g_idx": (k,),
              "w": (k, n), "onehot": (k, groups)}
    out[p] = {name: S(shape, jnp.int32 if name == "g_idx" else f32, sharding=sharding)
              for name, shape in shapes.items()}
  return out


def _row_plan(lay: Layout) -> refine_rows.RowPlan:
  """The row plan of block 0 (every block's has the same shapes): the samples' indices per
  micro-batch, -1 for the rows that fill the last one."""
  n, b = lay.run.nsamples, lay.batch
  ids = [np.where(np.arange(k * b, (k + 1) * b) < n, np.arange(k * b, (k + 1) * b), -1)
         for k in range(lay.nbatches)]
  return refine_rows.plan(ids, lay.slice.chips, steps=int(lay.cfg.refine_steps),
                          batch=int(lay.cfg.refine_batch), seed=lay.cfg.seed, block=0)


def programs(lay: Layout, kind) -> tuple[list[Program], int]:
  """(refinement's programs for one block, bytes per chip of the rows it gathers beside them)."""
  cfg = lay.cfg
  adapter = lay.adapter(kind)
  paths = tuple(p for g in adapter.sequential_groups for p in g if not float_by_default(p))
  hidden, ctx, mask = lay.stream_batch()
  st = refine_loop.Static(paths, (2**cfg.bits - 1,) * len(paths), int(cfg.refine_steps),
                          float(cfg.refine_lr), bool(cfg.refine_rounding),
                          min(int(cfg.refine_seqlen) or lay.seqlen, lay.seqlen))
  prepare, train, evaluate, final = refine_loop.compiled(adapter, st, lay.mesh, "data")
  block = lay.block(kind, lay.replicated)
  frozen = _frozen(lay, block, paths, lay.replicated)
  rows = lay.on_data(_row_plan(lay))
  plan, order = tuple(rows[:4]), rows[4]
  stream = ([hidden] * lay.nbatches, [ctx] * lay.nbatches, [mask] * lay.nbatches)
  train_set, held_set = lay.on_data(jax.eval_shape(prepare, *stream, block, plan))
  theta = jax.tree.map(lambda s: S(s.shape, s.dtype, sharding=lay.replicated),
                       jax.eval_shape(functools.partial(refine_loop.init_theta, st=st), frozen))
  progs = [measure("refinement: rows and float targets", "refinement", prepare,
                   (*stream, block, plan)),
           measure("refinement: training loop", "refinement", train,
                   (theta, frozen, block, train_set, held_set, order)),
           measure("refinement: per-layer measure", "refinement", evaluate,
                   (theta, frozen, block, held_set), calls=2),
           measure("refinement: final codes", "refinement", final,
                   (lay.on_home(theta), _frozen(lay, block, paths, lay.home)))]
  return progs, nbytes([train_set, held_set])

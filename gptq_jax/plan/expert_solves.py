"""The solver's programs for a mixture of experts' projections, compiled with the layer's shapes.

As ``pipeline/experts.quantize_expert_sets`` solves them (``core.batched.quantize_batched``): the
projections of a layer's experts that read one input (gate / up) concatenated in float32 into
``[E, in, out]``, the experts solved ``chunk`` at a time (``batched._chunk_size`` of the
``DEFAULT_CHUNK_BYTES`` budget; the last chunk padded with identity problems so one program serves
every chunk): ``_prepare_all`` (vmapped ``_prepare``), the inverse-Hessian factor expert by expert
(``factor._inverse_factor``: ``chunk`` calls per chunk), ``_solve_all`` (vmapped grids, column
loop and assembly; with several local chips the chunk's experts split over them,
``batched._spread_solve``). Then each projection's stacked codes packed expert by expert
(``weights._pack``, E calls) and the packed stack dequantized into the working block (the
vmapped ``_unpack`` and ``_dequantize`` that ``PackedWeight.dequantize`` runs). All on process 0's
first device, as the driver runs them.

``live`` of each program: what the solve keeps alive beside its arguments: the layer's finalized
expert Hessians ``[E, in, in]`` (the capture's), their padded copy, the float32 kernels and their
padded concatenation (the results go to the host after each chunk); while packing, the stacked
codes, scales and zero points of every projection of the set.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from gptq_jax.core import batched, factor, gptq, shared, weights
from gptq_jax.plan.layout import Layout
from gptq_jax.plan.measure import Program, measure
from gptq_jax.plan.solves import FACTOR_COMPILE_MAX, accounted_factor

S = jax.ShapeDtypeStruct
F32 = jnp.float32


@functools.lru_cache(maxsize=16)
def _stacked(fn, *static):
  """``fn`` vmapped over the experts (the batched program ``jax.vmap`` of a jitted ``fn``
  dispatches)."""
  return jax.jit(jax.vmap(lambda *a: fn(*a, *static)))


def expert_solve(lay: Layout, name: str, shapes: list[tuple[int, int, int]]
                 ) -> list[tuple[Program, int]]:
  """``[(program, live bytes beside it)]`` of one batched solve of expert projections of
  ``shapes`` (``[E, in, out]`` each) sharing one input."""
  cfg, st, home = lay.cfg, gptq._static_of(lay.cfg), lay.home
  E, k = shapes[0][0], shapes[0][1]
  out_total = sum(n for _, _, n in shapes)
  c = batched._chunk_size(k, out_total, E, batched.DEFAULT_CHUNK_BYTES)
  padded = E + (-E % c)
  chunks = padded // c
  live = 4 * (E * k * k + padded * k * k + E * k * out_total + padded * k * out_total)
  at = lambda shape, dtype=F32: S(shape, dtype, sharding=home)  # noqa: E731
  kernel, H = at((c, k, out_total)), at((c, k, k))
  out: list[tuple[Program, int]] = []
  Wp, _, _, perm = jax.eval_shape(batched._prepare_all, kernel, H, st)
  Wp, perm = at(Wp.shape), at(perm.shape, perm.dtype)
  out.append((measure(f"{name}: prepare ({c} experts)", "solves", batched._prepare_all,
                      (kernel, H, st), calls=chunks), live))
  if k > FACTOR_COMPILE_MAX and lay.slice_is_tpu:  # plan/solves.py: too slow to compile
    fac = dataclasses.replace(accounted_factor(name, k), alias_bytes=0, calls=padded)
  else:
    fac = measure(f"{name}: inverse-Hessian factor", "solves", factor._inverse_factor,
                  (at((k, k)), at(())), calls=padded)
  out.append((fac, live))
  U = at((c, k, k))
  m = shared._rows_mesh(lay.spread, c, "experts")
  if m is None:
    loop, args = batched._solve_all, (kernel, H, Wp, U, st, perm)
    label = f"{name}: column loop ({c} experts)"
  else:
    put = lambda s: S(s.shape, s.dtype, sharding=NamedSharding(m, P("experts")))  # noqa: E731
    loop, args = batched._spread_solve(m, st), tuple(put(a) for a in (kernel, H, Wp, U, perm))
    label = f"{name}: column loop ({c} experts over {m.devices.size} chips)"
  out.append((measure(label, "solves", loop, args, calls=chunks), live))
  codes, scales, zeros, g_idx, _ = jax.eval_shape(batched._solve_all, kernel, H, Wp, U, st, perm)
  # after the solve only every projection's stacked codes, scales, zeros and g_idx stay (the
  # Hessians and float32 copies are released before packing)
  per_col = sum(a.dtype.itemsize * a.shape[1] for a in (codes, scales, zeros))
  live = E * (per_col * out_total + g_idx.dtype.itemsize * k * len(shapes))
  for e, kk, n in shapes:  # each projection: packed expert by expert, dequantized stacked
    c1 = at((kk, n), codes.dtype)
    z1 = at((zeros.shape[1], n), zeros.dtype)
    qw, qz = jax.eval_shape(weights._pack, c1, z1, cfg.bits, cfg.format)
    out.append((measure(f"{name}: pack {kk}x{n}", "solves", weights._pack,
                        (c1, z1, cfg.bits, cfg.format), calls=e), live))
    qws, qzs = at((e,) + qw.shape, qw.dtype), at((e,) + qz.shape, qz.dtype)
    unpack = _stacked(weights._unpack, cfg.bits, cfg.format)
    c2, z2 = jax.eval_shape(unpack, qws, qzs)
    out.append((measure(f"{name}: unpack {e}x{kk}x{n}", "solves", unpack, (qws, qzs)), live))
    deq = _stacked(weights._dequantize, lay.dtype)
    args = (at(c2.shape, c2.dtype), at((e, scales.shape[1], n), scales.dtype),
            at(z2.shape, z2.dtype), at((e,) + g_idx.shape[1:], g_idx.dtype))
    out.append((measure(f"{name}: dequantize {e}x{kk}x{n}", "solves", deq, args), live))
  return out

"""The solver's programs for one solve of a subset, compiled with the layer's real shapes.

As ``driver._quantize_group`` solves: the layers of a subset that read one input (q/k/v, gate/up)
in one ``core.shared.quantize_shared`` call — their kernels concatenated in float32, ``_prepare``
(dead columns, the column order), the inverse-Hessian factor (``factor._inverse_factor_donated``),
``_fixed_grids``, the column loop (``_gptq_blocks``; with several local chips its rows split over
them, ``shared._spread_loop``), ``_assemble`` — then each layer packed (``weights._pack``) and
dequantized for the working block (``weights._unpack``, ``weights._dequantize``). GPTAQ solves
each layer alone (``quantize_weight`` with the cross-term: ``gptaq.correction`` beside). All on
process 0's first device (the home device), as the driver runs them.

``live`` of each program: the solve's buffers alive beside the program's own arguments (the
concatenated kernel and H stay referenced through the whole solve, Wp and U once made).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from gptq_jax.core import factor, gptaq, gptq, shared, weights
from gptq_jax.plan.layout import Layout
from gptq_jax.plan.measure import Program, measure, nbytes

S = jax.ShapeDtypeStruct
# The TPU compiler's time for the inverse-Hessian factor (a Cholesky and a triangular inverse)
# grows steeply with the layer's input size (measured on this 2-core CPU: 86-102 s at 2048 inputs,
# 333 s at 4096; a 14336-input down projection would take about an hour). Above this size the
# factor is accounted, not compiled (``accounted_factor``); every other program still compiles.
FACTOR_COMPILE_MAX = 2048


def accounted_factor(name: str, n: int) -> Program:
  """The factor program of an ``n``-input layer by accounting (float32): H (donated) in, U out, two
  ``n x n`` work buffers (the Cholesky factor and the inverse's workspace); flops of a Cholesky
  (n^3 / 3) and a triangular inverse (n^3 / 3); bytes: each buffer read and written once (a lower
  bound). Its name says it was not compiled."""
  square = 4 * n * n
  return Program(name=f"{name}: inverse-Hessian factor (accounted, not compiled: n={n})",
                 phase="solves", calls=1, argument_bytes=square + 4, output_bytes=square + 1,
                 alias_bytes=square, temp_bytes=2 * square, code_bytes=0,
                 flops=2 * n ** 3 / 3, bytes_accessed=6.0 * square, loops=0)


def _home(lay: Layout, fn, *args):
  return lay.on_home(jax.eval_shape(fn, *args))


def solve(lay: Layout, name: str, shapes: list[tuple[int, int]], cross: bool
          ) -> list[tuple[Program, int]]:
  """``[(program, live bytes beside it)]`` of one solve of layers of ``shapes`` ([in, out] each)
  sharing one input."""
  cfg, st, home = lay.cfg, gptq._static_of(lay.cfg), lay.home
  k = shapes[0][0]
  rows = sum(n for _, n in shapes)
  together = len(shapes) > 1 or lay.spread is not None
  kernel = S((k, rows), jnp.float32 if together and not cross else lay.dtype, sharding=home)
  H = S((k, k), jnp.float32, sharding=home)
  C = S((k, k), jnp.float32, sharding=home) if cross else None
  out: list[tuple[Program, int]] = []
  add = lambda prog, live: out.append((prog, nbytes(live)))  # noqa: E731

  prep_args = (kernel, H, st, C) if cross else (kernel, H, st)
  Wp, Hp, Cp, perm = _home(lay, gptq._prepare, *prep_args)
  add(measure(f"{name}: prepare", "solves", gptq._prepare, prep_args), [])
  damp = S((), jnp.float32, sharding=home)
  U, _ = _home(lay, factor._inverse_factor_impl, Hp, damp)
  factor_prog = (accounted_factor(name, k) if k > FACTOR_COMPILE_MAX and lay.slice_is_tpu else
                 measure(f"{name}: inverse-Hessian factor", "solves", factor._inverse_factor_donated,
                         (Hp, damp)))
  add(factor_prog, [kernel, H, Wp, Cp])
  grids0, sgrids = _home(lay, gptq._fixed_grids, kernel, H, st)
  add(measure(f"{name}: fixed grids", "solves", gptq._fixed_grids, (kernel, H, st)), [Wp, U, Cp])
  Pm = None
  if cross:
    Pm = _home(lay, gptaq.correction, Cp, U, jnp.float32(cfg.gptaq_alpha))
    add(measure(f"{name}: GPTAQ correction", "solves", gptaq.correction,
                (Cp, U, S((), jnp.float32, sharding=home))), [kernel, H, Wp])
  rmesh = None if cross else shared._rows_mesh(lay.spread, rows)
  if rmesh is not None:
    put = lambda s, *spec: S(s.shape, s.dtype, sharding=NamedSharding(rmesh, P(*spec)))  # noqa
    loop_args = (put(Wp, None, "rows"), put(U), put(perm), tuple(put(g, "rows") for g in grids0),
                 tuple(put(g, None, "rows") for g in sgrids))
    loop = shared._spread_loop(rmesh, st)
    q, Sg, Zg, _ = _home(lay, loop, *loop_args)
    add(measure(f"{name}: column loop (rows over {rmesh.devices.size} chips)", "solves", loop,
                loop_args), [kernel, H, Wp, U])
  else:
    loop_args = (Wp, U, perm, grids0, sgrids, st) + ((Pm,) if cross else ())
    q, Sg, Zg, _ = _home(lay, gptq._gptq_blocks, *loop_args)
    add(measure(f"{name}: column loop", "solves", gptq._gptq_blocks, loop_args), [kernel, H])
  asm_args = (q, Sg, Zg, perm, sgrids, st)
  codes, scales, zeros, g_idx = _home(lay, gptq._assemble, *asm_args)
  add(measure(f"{name}: assemble", "solves", gptq._assemble, asm_args), [kernel, H, U, Wp])
  for kk, n in shapes:  # each layer: pack, and dequantize into the working block
    c = S((kk, n), codes.dtype, sharding=home)
    z = S((zeros.shape[0], n), zeros.dtype, sharding=home)
    s = S((scales.shape[0], n), scales.dtype, sharding=home)
    qw, qz = _home(lay, weights._pack, c, z, cfg.bits, cfg.format)
    add(measure(f"{name}: pack {kk}x{n}", "solves", weights._pack, (c, z, cfg.bits, cfg.format)),
        [codes, scales, zeros])
    c2, z2 = _home(lay, weights._unpack, qw, qz, cfg.bits, cfg.format)
    add(measure(f"{name}: unpack {kk}x{n}", "solves", weights._unpack,
                (qw, qz, cfg.bits, cfg.format)), [codes, scales, zeros])
    add(measure(f"{name}: dequantize {kk}x{n}", "solves", weights._dequantize,
                (c2, s, z2, g_idx, lay.dtype)), [codes, scales, zeros, qw, qz])
  return out

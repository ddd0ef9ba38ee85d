"""The TPU (Mosaic) kernel: packed GPTQ int32 words in, ``x @ W`` out, W never materialized in HBM.

Grid ``(M / bm, N / bn, K / bk)``, K innermost ("arbitrary") into a float32 VMEM accumulator. A
grid step holds ``nc = bk / bkc`` chunks; per chunk: load ``bkc / nvals`` word rows, unpack the
``nvals`` codes of each word with shifts and masks (one 3-D elementwise op), subtract the zero
points and multiply by the scales (both broadcast from one row per group), merge the leading axis
into the sublanes (aligned: word rows are a multiple of 8), and run one MXU dot against the chunk
of activations that ``layout.arrange_x`` put in the same value-major order. Only 2/4/8 bits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from gptq_jax.core.packing import run_shape
from gptq_jax.kernels import layout
from gptq_jax.kernels.block_sizes import BlockSizes


def _kernel(x_ref, w_ref, s_ref, z_ref, o_ref, acc_ref, *, bits: int, nc: int, rc: int,
            s_step: int):
  # x_ref:   (nc, bm, bkc)       activations, each chunk in value-major order (x dtype)
  # w_ref:   (bk / nvals, bn)    packed words, int32
  # s_ref:   (lb, gc, 1, bn)     scales of the step's groups (lb = nc, or 1 inside one group)
  # z_ref:   (lb, gc, 1, bn)     integer zero points, as floats
  # o_ref:   (bm, bn)            output (x dtype)
  # acc_ref: (bm, bn)            float32 accumulator, lives across the K steps
  @pl.when(pl.program_id(2) == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  def chunk(c, carry):
    words = w_ref[pl.ds(pl.multiple_of(c * rc, rc), rc), :]  # (rc, bn)
    w = layout.dequantize_chunk(words, s_ref[c * s_step], z_ref[c * s_step], bits)  # (bkc, bn)
    xc = x_ref[c]  # (bm, bkc)
    precision = lax.Precision.HIGHEST if xc.dtype == jnp.float32 else None
    acc_ref[...] += jnp.dot(xc, w.astype(xc.dtype), precision=precision,
                            preferred_element_type=jnp.float32)
    return carry

  lax.fori_loop(0, nc, chunk, 0, unroll=nc <= 4)

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _store():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def matmul(x: jax.Array, qweight: jax.Array, scales: jax.Array, zeros: jax.Array, *, bits: int,
           group_size: int, blocks: BlockSizes, interpret: bool = False) -> jax.Array:
  """``x [M, K] @ W -> [M, N]`` in ``x.dtype``; W given by ``qweight [K * bits / 32, N]`` int32,
  ``scales`` / ``zeros`` ``[G, N]`` with contiguous groups. ``blocks`` from ``choose_tpu``."""
  m, k = x.shape
  n = qweight.shape[1]
  nvals, _ = run_shape(bits)
  bm, bn, bk, bkc = blocks.bm, blocks.bn, blocks.bk, blocks.bkc
  gs = layout.effective_group_size(group_size, k)
  gc = layout.groups_per_chunk(bkc, gs)
  nc, rc = bk // bkc, bkc // nvals
  xs, s4, z4, m_pad = layout.arrange_operands(x, scales, zeros, bm=bm, bkc=bkc, gc=gc, bits=bits)
  if bkc % gs == 0:  # each chunk holds gc whole groups: a step's nc chunks are nc leading rows
    lb, s_step, s_index = nc, 1, lambda i, j, kk: (kk, 0, 0, j)
  else:  # the whole step lies inside one group
    lb, s_step, s_index = 1, 0, lambda i, j, kk: (lax.div(kk * bk, gs), 0, 0, j)
  kernel = functools.partial(_kernel, bits=bits, nc=nc, rc=rc, s_step=s_step)
  # What the kernel does, for XLA's cost model (cost_analysis() of a program holding it): the
  # dot's multiply-adds, and each operand read once per pass over the other (x once per column
  # tile, the packed words and grids once per row tile), the output written once.
  row_tiles, col_tiles = m_pad // bm, n // bn
  cost = pl.CostEstimate(
      flops=2 * m_pad * k * n, transcendentals=0,
      bytes_accessed=(xs.size * xs.dtype.itemsize * col_tiles
                      + (qweight.size * 4 + (s4.size + z4.size) * s4.dtype.itemsize) * row_tiles
                      + m_pad * n * x.dtype.itemsize))
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m_pad, n), x.dtype),
      grid=(m_pad // bm, n // bn, k // bk),
      in_specs=[
          pl.BlockSpec((nc, bm, bkc), lambda i, j, kk: (kk, i, 0)),
          pl.BlockSpec((bk // nvals, bn), lambda i, j, kk: (kk, j)),
          pl.BlockSpec((lb, gc, 1, bn), s_index),
          pl.BlockSpec((lb, gc, 1, bn), s_index),
      ],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      cost_estimate=cost,
      name=f"gptq_matmul_tpu_{bits}bit",
  )(xs, qweight, s4, z4)
  return out[:m] if m_pad != m else out

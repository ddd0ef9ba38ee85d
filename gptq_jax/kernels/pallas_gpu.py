"""The GPU (Triton) kernel: the same chunk formulation as the TPU kernel, one program per output
tile walking all of K.

Grid ``(M / bm, N / bn)``. A program loops over the ``K / bkc`` chunks with a float32 accumulator in
registers: load ``bkc / nvals`` word rows, unpack with shifts and masks, subtract zeros, scale,
reshape to ``[bkc, bn]`` and ``dot`` with the chunk of activations in the same value-major order.
Triton wants every tensor a power of two and every dot at least 16 on each side (``choose_gpu``).
Only 2/4/8 bits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gptq_jax.core.packing import run_shape
from gptq_jax.kernels import layout
from gptq_jax.kernels.block_sizes import BlockSizes


def _kernel(x_ref, w_ref, s_ref, z_ref, o_ref, *, bits: int, nkc: int, rc: int, bkc: int,
            gs: int, gc: int):
  # x_ref: (nkc, bm, bkc)        activations, each chunk in value-major order (x dtype)
  # w_ref: (K / nvals, bn)       packed words, int32
  # s_ref: (G / gc, gc, 1, bn)   scales, one leading row per chunk-aligned run of groups
  # z_ref: (G / gc, gc, 1, bn)   integer zero points, as floats
  # o_ref: (bm, bn)              output (x dtype)
  bm, bn = o_ref.shape

  def chunk(c, acc):
    words = w_ref[pl.ds(c * rc, rc), :]  # (rc, bn)
    row = lax.div(c * bkc, gc * gs)
    w = layout.dequantize_chunk(words, s_ref[row], z_ref[row], bits)  # (bkc, bn)
    xc = x_ref[c]  # (bm, bkc)
    precision = lax.Precision.HIGHEST if xc.dtype == jnp.float32 else None
    return acc + jnp.dot(xc, w.astype(xc.dtype), precision=precision,
                         preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, nkc, chunk, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def matmul(x: jax.Array, qweight: jax.Array, scales: jax.Array, zeros: jax.Array, *, bits: int,
           group_size: int, blocks: BlockSizes, interpret: bool = False,
           num_warps: int = 4, num_stages: int = 2) -> jax.Array:
  """``x [M, K] @ W -> [M, N]`` in ``x.dtype`` (see ``pallas_tpu.matmul``); ``blocks`` from
  ``choose_gpu``."""
  m, k = x.shape
  n = qweight.shape[1]
  nvals, _ = run_shape(bits)
  bm, bn, bkc = blocks.bm, blocks.bn, blocks.bkc
  gs = layout.effective_group_size(group_size, k)
  gc = layout.groups_per_chunk(bkc, gs)
  nkc, rc = k // bkc, bkc // nvals
  xs, s4, z4, m_pad = layout.arrange_operands(x, scales, zeros, bm=bm, bkc=bkc, gc=gc, bits=bits)
  g_rows = s4.shape[0]
  kernel = functools.partial(_kernel, bits=bits, nkc=nkc, rc=rc, bkc=bkc, gs=gs, gc=gc)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m_pad, n), x.dtype),
      grid=(m_pad // bm, n // bn),
      in_specs=[
          pl.BlockSpec((nkc, bm, bkc), lambda i, j: (0, i, 0)),
          pl.BlockSpec((k // nvals, bn), lambda i, j: (0, j)),
          pl.BlockSpec((g_rows, gc, 1, bn), lambda i, j: (0, 0, 0, j)),
          pl.BlockSpec((g_rows, gc, 1, bn), lambda i, j: (0, 0, 0, j)),
      ],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=f"gptq_matmul_gpu_{bits}bit",
  )(xs, qweight, s4, z4)
  return out[:m] if m_pad != m else out

"""Unpack -> dequantize -> dot: the oracle every kernel is tested against, and the XLA path.

* ``reference_matmul``: the oracle, written for clarity: ``x @ w.dequantize()`` in float32 at
  HIGHEST precision, cast to ``x.dtype``.
* ``xla_matmul``: the XLA path, for weights whose groups are contiguous (natural ``g_idx``, or a
  ``PreparedWeight``). It unpacks chunk by chunk with shifts and masks per word row (the layout of
  ``layout.py``), never an interleaving gather, and never a dequantized copy of the whole weight
  on CPU: there N tiles x K-chunks are scanned, each step unpacking a cache-sized tile of codes
  and applying scales and zeros to partial sums per group (``_xla_scan``); at one or two rows
  (decoding) and one-word runs (2/4/8 bits) the codes are never written out at all: one fused
  elementwise pass multiplies each word's values by their activations (``_xla_rows``). On TPU /
  GPU the chunks are dequantized in one fused elementwise op in the compute dtype and fed to one
  dot.
* ``gather_matmul``: any ``g_idx`` (act-order without ``prepare_for_kernel``): scales gathered per
  row, then a dot. Correct, not fast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from gptq_jax.core.packing import run_shape
from gptq_jax.core.weights import PackedWeight, QuantizedWeight
from gptq_jax.kernels import layout
from gptq_jax.kernels.prepare import PreparedWeight

HIGHEST = lax.Precision.HIGHEST
XLA_CHUNK = 128  # K-rows per CPU scan step (one group at the usual group_size)
XLA_TILE = 96 * 1024  # float32 codes per CPU scan step ([bkc, nt], ~384 KB: L2-resident)
ROWS_MAX = 2  # up to this many rows of x, the CPU path runs _xla_rows (measured crossover ~2)


def reference_matmul(x: jax.Array, w: PackedWeight | QuantizedWeight | PreparedWeight) -> jax.Array:
  """The oracle: ``x [..., K] @ w.dequantize() [K, N] -> [..., N]`` in ``x.dtype``."""
  y = jnp.matmul(x.astype(jnp.float32), w.dequantize(jnp.float32), precision=HIGHEST)
  return y.astype(x.dtype)


def gather_matmul(x: jax.Array, w: PackedWeight) -> jax.Array:
  """``x [M, K] @ w.dequantize()`` for any ``g_idx``, in float32 -> ``[M, N]`` float32."""
  dt = jnp.float32 if x.dtype == jnp.float32 else x.dtype
  return jnp.dot(x.astype(dt), w.dequantize(dt), precision=_precision(dt),
                 preferred_element_type=jnp.float32)


def xla_chunk_size(in_features: int, group_size: int, bits: int, target: int = XLA_CHUNK) -> int | None:
  """The K-chunk of the XLA path: the largest legal divisor of K up to ``target`` (else the
  smallest above it), or None when groups cannot be expanded per run (``group_size`` not a
  multiple of the values per run, e.g. 3-bit with group 16)."""
  nvals, _ = run_shape(bits)
  gs = layout.effective_group_size(group_size, in_features)
  if gs % nvals:
    return None
  legal = [c for c in range(nvals, in_features + 1, nvals)
           if in_features % c == 0 and layout.groups_per_chunk(c, gs) is not None]
  small = [c for c in legal if c <= target]
  return max(small) if small else (min(legal) if legal else None)


def _precision(dtype):
  return HIGHEST if dtype == jnp.float32 else None


def _chunks(w: PreparedWeight, bkc: int):
  """Per-chunk views: words [nch, rc * nwords, N], scales / zeros [G / gc, gc, 1, N], gc, gs."""
  k, n = w.shape
  nvals, nwords = run_shape(w.bits)
  gs = layout.effective_group_size(w.group_size, k)
  gc = layout.groups_per_chunk(bkc, gs)
  words = w.qweight.reshape(k // bkc, bkc // nvals * nwords, n)
  return words, layout.arrange_groups(w.scales, gc), layout.arrange_groups(w.zeros, gc), gc, gs


def _n_tile(n: int, bkc: int) -> int:
  """Output columns per CPU scan step: the largest divisor of N keeping a chunk's float codes
  ``[bkc, nt]`` within ``XLA_TILE`` elements (L2-resident), or all of N if N has no such divisor
  of useful size."""
  target = max(128, XLA_TILE // bkc)
  if n <= target:
    return n
  nt = max(d for d in range(1, target + 1) if n % d == 0)
  return nt if nt * 4 >= target else n


def _xla_scan(x: jax.Array, w: PreparedWeight, bkc: int) -> jax.Array:
  """CPU: x [M, K] -> [M, N] float32, group-factored and tiled for the cache.

  ``y[:, n] = sum_g s[g, n] * (x_g @ q_g[:, n] - z[g, n] * sum(x_g))``: the scales and zeros are
  applied to ``[M, N]`` partial sums, not to the ``[K, N]`` weight, so a step only unpacks its codes
  to float32 and runs one dot. ``lax.map`` over N tiles, ``scan`` over K-chunks inside, so each
  step's float tile ``[bkc, nt]`` stays in L2 (whole-weight float temporaries cost more than the
  dot on a CPU).
  """
  k, n = w.shape
  m = x.shape[0]
  nvals, nwords = run_shape(w.bits)
  gs = layout.effective_group_size(w.group_size, k)
  gc = layout.groups_per_chunk(bkc, gs)
  rows_g, nch, nt = bkc // gc, k // bkc, _n_tile(n, bkc)  # rows per group in a chunk
  words_c = bkc // nvals * nwords  # word rows per chunk
  # x per chunk and group, each group's columns in value-major order: [nch, gc, M, rows_g].
  xs = x.astype(jnp.float32).reshape(m, nch, gc, rows_g // nvals, nvals)
  xs = xs.transpose(1, 2, 0, 4, 3).reshape(nch, gc, m, rows_g)
  x_sums = xs.sum(axis=-1)  # [nch, gc, M]
  scales, zeros = w.scales.astype(jnp.float32), w.zeros.astype(jnp.float32)

  def tile(j):
    def step(acc, inp):
      c, x_c, xsum_c = inp  # [], [gc, M, rows_g], [gc, M]
      words = lax.dynamic_slice(w.qweight, (c * words_c, j * nt), (words_c, nt))
      codes = jax.vmap(lambda wg: layout.unpack_chunk(wg, w.bits))(words.reshape(gc, -1, nt))
      codes = codes.astype(jnp.float32).reshape(gc, rows_g, nt)  # value-major per group
      g0 = layout.group_row(c, bkc, gs, 1)
      s_c = lax.dynamic_slice(scales, (g0, j * nt), (gc, nt))
      z_c = lax.dynamic_slice(zeros, (g0, j * nt), (gc, nt))
      if gc == 1:  # a plain dot: XLA:CPU runs batched dots far slower
        p = jnp.dot(x_c[0], codes[0], precision=HIGHEST)[None]  # [1, M, nt]
      else:
        p = jnp.einsum("gmk,gkn->gmn", x_c, codes, precision=HIGHEST)  # [gc, M, nt]
      part = s_c[:, None] * (p - xsum_c[..., None] * z_c[:, None])  # [gc, M, nt]
      return acc + jnp.sum(part, axis=0), None

    acc, _ = lax.scan(step, jnp.zeros((m, nt), jnp.float32), (jnp.arange(nch), xs, x_sums))
    return acc

  return lax.map(tile, jnp.arange(n // nt)).transpose(1, 0, 2).reshape(m, n)


def _xla_rows(x: jax.Array, w: PreparedWeight) -> jax.Array:
  """CPU, few rows, one-word runs: x [M, K] -> [M, N] float32 without materializing codes.

  Word row ``r`` holds input rows ``nvals * r + j`` at shift ``bits * j``, so per output row
  ``t[r, n] = s[g(r), n] * sum_j x[nvals * r + j] * code_j[r, n]`` is one fused elementwise pass
  over ``qweight`` (one word read, one float written per ``nvals`` codes), and
  ``y = ones @ t - (sum_g x_g z_g s_g)``: a plain matrix-vector product reads ``t`` once. A
  group of ``gs`` rows spans ``gs / nvals`` whole word rows (``xla_chunk_size`` checked that).
  """
  k, n = w.shape
  nvals, _ = run_shape(w.bits)
  gs = layout.effective_group_size(w.group_size, k)
  n_words, rows_g, groups = k // nvals, gs // nvals, w.scales.shape[0]
  xr = x.astype(jnp.float32).reshape(x.shape[0], n_words, nvals)  # [M, R, nvals]
  scales, zeros = w.scales.astype(jnp.float32), w.zeros.astype(jnp.float32)
  s_rows = jnp.repeat(scales, rows_g, axis=0)[:n_words]  # [R, N]: each word row's group scale
  mask = jnp.int32(2**w.bits - 1)
  codes = [(lax.shift_right_logical(w.qweight, jnp.int32(w.bits * j)) & mask).astype(jnp.float32)
           for j in range(nvals)]  # fused into the pass below, never stored
  ones = jnp.ones((1, n_words), jnp.float32)
  rows = []
  for xm in xr:  # [R, nvals]
    t = sum(xm[:, j, None] * codes[j] for j in range(nvals)) * s_rows  # [R, N]
    rows.append(jnp.dot(ones, t, precision=HIGHEST))
  pad = groups * rows_g - n_words
  x_g = jnp.pad(xr.sum(-1), ((0, 0), (0, pad))).reshape(-1, groups, rows_g).sum(-1)  # [M, G]
  return jnp.concatenate(rows) - jnp.dot(x_g, zeros * scales, precision=HIGHEST)


def _xla_cpu(x: jax.Array, w: PreparedWeight, bkc: int) -> jax.Array:
  if x.shape[0] <= ROWS_MAX and run_shape(w.bits)[1] == 1:
    return _xla_rows(x, w)
  return _xla_scan(x, w, bkc)


def _xla_fused(x: jax.Array, w: PreparedWeight, bkc: int) -> jax.Array:
  """TPU / GPU: all chunks dequantized in the compute dtype, one dot. -> [M, N] float32."""
  words, s4, z4, gc, gs = _chunks(w, bkc)
  nch = words.shape[0]
  rows = layout.group_row(jnp.arange(nch), bkc, gs, gc)
  dt = jnp.float32 if x.dtype == jnp.float32 else x.dtype
  deq = jax.vmap(lambda wc, s, z: layout.dequantize_chunk(wc, s, z, w.bits).astype(dt))
  w_all = deq(words, s4[rows], z4[rows]).reshape(w.in_features, w.out_features)  # value-major
  xs = layout.arrange_x(x.astype(dt), bkc, w.bits)  # [nch, M, bkc]
  x_perm = xs.transpose(1, 0, 2).reshape(x.shape[0], w.in_features)
  return jnp.dot(x_perm, w_all, precision=_precision(dt), preferred_element_type=jnp.float32)


def xla_matmul(x: jax.Array, w: PreparedWeight) -> jax.Array:
  """``x [M, K]`` (already in ``w``'s row order) ``@ w`` -> ``[M, N]`` float32.

  ``w`` must have contiguous groups (its ``perm`` already applied to ``x``) and a chunking
  (``xla_chunk_size`` not None); the caller falls back to ``gather_matmul`` otherwise.
  """
  bkc = xla_chunk_size(w.in_features, w.group_size, w.bits)
  if bkc is None:
    raise ValueError(f"no XLA chunking for in_features={w.in_features}, group_size="
                     f"{w.group_size}, bits={w.bits}: use gather_matmul")
  return lax.platform_dependent(
      x, w, cpu=lambda x, w: _xla_cpu(x, w, bkc), default=lambda x, w: _xla_fused(x, w, bkc))

"""The chunked layout shared by the XLA path and both Pallas kernels.

GPTQ packs ``nvals`` consecutive input rows into a run of ``nwords`` int32 words (4-bit: 8 rows in
one word; 2-bit: 16 in one; 8-bit: 4 in one; 3-bit: 32 in three). A *chunk* is ``bkc`` consecutive
input rows (``rc = bkc / nvals`` runs). Unpacking a chunk's words with shifts and masks gives the
chunk's rows in *value-major* order: row ``(v, r)`` is input ``chunk_start + r * nvals + v``
(docs/format.md, running packed weights). Rather than interleaving those rows back (a sublane shuffle no kernel
wants), the activations are permuted the same way once, outside: ``arrange_x`` lays ``x`` out as
``[chunks, M, bkc]`` with each chunk's columns in value-major order, so a chunk is one plain dot.

Groups: a chunk either holds ``gc = bkc / gs`` whole groups (``gs`` divides ``bkc``) or lies inside
one group (``bkc`` divides ``gs``; ``gc = 1``). ``arrange_groups`` views scales / zeros
``[G, N]`` as ``[G / gc, gc, 1, N]`` so that a chunk's rows are one leading index and every kernel
block keeps ``(1, bn)`` as its last two dims.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from gptq_jax.core.packing import run_shape


def effective_group_size(group_size: int, in_features: int) -> int:
  """``group_size`` with -1 (one group over all rows) made explicit."""
  return in_features if group_size == -1 else group_size


def groups_per_chunk(bkc: int, gs: int) -> int | None:
  """``gc`` for a chunk of ``bkc`` rows and groups of ``gs``, or None if they do not nest."""
  if bkc % gs == 0:
    return bkc // gs
  if gs % bkc == 0:
    return 1
  return None


def group_row(chunk: jax.Array | int, bkc: int, gs: int, gc: int):
  """The leading index in the ``arrange_groups`` view of global chunk ``chunk``."""
  return (chunk * bkc) // (gc * gs)


def arrange_x(x: jax.Array, bkc: int, bits: int) -> jax.Array:
  """``x: [M, K]`` -> ``[K / bkc, M, bkc]``, each chunk's columns in value-major order."""
  m, k = x.shape
  nvals, _ = run_shape(bits)
  rc = bkc // nvals
  x = x.reshape(m, k // bkc, rc, nvals)  # [M, chunk, r, v]
  return x.transpose(1, 0, 3, 2).reshape(k // bkc, m, bkc)  # [chunk, M, (v, r)]


def arrange_groups(a: jax.Array, gc: int) -> jax.Array:
  """Scales or zeros ``[G, N]`` -> ``[G / gc, gc, 1, N]``."""
  g, n = a.shape
  return a.reshape(g // gc, gc, 1, n)


def arrange_operands(x: jax.Array, scales: jax.Array, zeros: jax.Array, *, bm: int, bkc: int,
                     gc: int, bits: int):
  """What both kernels take: ``x [M, K]`` padded to a multiple of ``bm`` rows and arranged by
  ``arrange_x`` (``[K / bkc, M_pad, bkc]``), scales and zeros (as scale dtype) by ``arrange_groups``
  (``[G / gc, gc, 1, N]``). Returns ``(xs, s4, z4, m_pad)``."""
  m = x.shape[0]
  m_pad = -(-m // bm) * bm
  x = jnp.pad(x, ((0, m_pad - m), (0, 0))) if m_pad != m else x
  return (arrange_x(x, bkc, bits), arrange_groups(scales, gc),
          arrange_groups(zeros.astype(scales.dtype), gc), m_pad)


def expand_rows(a: jax.Array, rc: int) -> jax.Array:
  """``[gc, 1, N]`` per-group rows -> ``[rc, N]`` per-run rows (each group covers rc/gc runs)."""
  gc, _, n = a.shape
  if gc == 1:
    return jnp.broadcast_to(a[0], (rc, n))
  return jnp.broadcast_to(a, (gc, rc // gc, n)).reshape(rc, n)


def unpack_chunk(words: jax.Array, bits: int) -> jax.Array:
  """int32 words of one chunk -> codes ``[nvals, rc, N]`` int32 (value-major).

  2/4/8 bits: ``words: [rc, N]``; code ``v`` of word row ``r`` is ``(w >> bits*v) & mask``,
  vectorised over ``v`` with an iota so both Mosaic and Triton see a single 3-D elementwise op.
  3 bits: ``words: [3 * rc, N]`` (runs of three words); values 10 and 21 straddle two words.
  """
  mask = jnp.int32(2**bits - 1)
  nvals, nwords = run_shape(bits)
  if nwords == 1:
    rc, n = words.shape
    shifts = lax.broadcasted_iota(jnp.int32, (nvals, rc, n), 0) * bits
    return lax.shift_right_logical(jnp.broadcast_to(words[None], (nvals, rc, n)), shifts) & mask
  rc3, n = words.shape
  w = words.reshape(rc3 // nwords, nwords, n)
  vals = []
  for v in range(nvals):
    word, shift = divmod(bits * v, 32)
    val = lax.shift_right_logical(w[:, word], jnp.int32(shift))
    if shift + bits > 32:  # straddles into the next word
      val = val | lax.shift_left(w[:, word + 1], jnp.int32(32 - shift))
    vals.append(val & mask)
  return jnp.stack(vals)


def dequantize_chunk(words: jax.Array, scales: jax.Array, zeros: jax.Array, bits: int) -> jax.Array:
  """One chunk -> its dequantized rows ``[bkc, N]`` float32 in value-major order.

  words: see ``unpack_chunk``; scales, zeros: ``[gc, 1, N]`` (the chunk's groups).
  """
  codes = unpack_chunk(words, bits)  # [nvals, rc, N]
  nvals, rc, n = codes.shape
  s = expand_rows(scales.astype(jnp.float32), rc)[None]  # [1, rc, N]
  z = expand_rows(zeros.astype(jnp.float32), rc)[None]
  return ((codes.astype(jnp.float32) - z) * s).reshape(nvals * rc, n)

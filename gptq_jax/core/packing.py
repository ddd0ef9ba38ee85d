"""int32 packing of GPTQ codes, bit-exact with the Hugging Face GPTQ layout (docs/format.md).

Every run of ``32 / gcd(bits, 32)`` values is one little-endian bit stream of ``bits / gcd`` 32-bit
words: value ``j`` sits at bit ``bits * j`` of the stream. For 2, 4 and 8 bits a run is one word
(``sum_j v_j << bits*j``); for 3 bits 32 values fill 3 words and values 10 and 21 straddle a word
boundary, exactly the ``w0 / w1 / w2`` layout of the references. ``qweight`` packs along the input
dimension (axis 0), ``qzeros`` along the output dimension (axis 1). Arithmetic is in uint32, the
result bit-cast to int32. All functions are jit-friendly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)


def run_shape(bits: int) -> tuple[int, int]:
  """(values, words) in one packing run."""
  if bits not in SUPPORTED_BITS:
    raise ValueError(f"bits={bits!r} cannot be packed: bits must be one of {SUPPORTED_BITS}")
  g = math.gcd(bits, 32)
  return 32 // g, bits // g


def _pack_runs(v, bits: int):
  """``v: [runs, values_per_run, ...]`` uint32 -> ``[runs, words_per_run, ...]`` uint32."""
  nvals, nwords = run_shape(bits)
  words = [jnp.zeros(v.shape[:1] + v.shape[2:], jnp.uint32) for _ in range(nwords)]
  for j in range(nvals):
    word, shift = divmod(bits * j, 32)
    words[word] = words[word] | (v[:, j] << shift)
    if shift + bits > 32:  # straddles into the next word (3-bit only)
      words[word + 1] = words[word + 1] | (v[:, j] >> (32 - shift))
  return jnp.stack(words, axis=1)


def _unpack_runs(w, bits: int):
  """``w: [runs, words_per_run, ...]`` uint32 -> ``[runs, values_per_run, ...]`` uint32."""
  nvals, _ = run_shape(bits)
  mask = jnp.uint32(2**bits - 1)
  vals = []
  for j in range(nvals):
    word, shift = divmod(bits * j, 32)
    v = w[:, word] >> shift
    if shift + bits > 32:
      v = v | (w[:, word + 1] << (32 - shift))
    vals.append(v & mask)
  return jnp.stack(vals, axis=1)


def check_length(n: int, bits: int, what: str) -> None:
  nvals, _ = run_shape(bits)
  if n % nvals:
    raise ValueError(
        f"{what} has length {n}, which {bits}-bit GPTQ packing cannot store: it must be a "
        f"multiple of {nvals}")


def check_range(values, bits: int, what: str) -> None:
  """Refuse values outside ``[0, 2**bits)``: packed, they would spill into their neighbours'
  bits. (Traced values are checked when concrete; ``pack_rows`` masks them meanwhile.)"""
  if isinstance(values, jax.core.Tracer):
    return
  a = np.asarray(values)
  bad = int(np.sum((a < 0) | (a > 2**bits - 1)))
  if bad:
    raise ValueError(f"{bad} {what} lie outside [0, {2**bits - 1}] (range [{int(a.min())}, "
                     f"{int(a.max())}]): {bits}-bit packing cannot store them")


def pack_rows(q, bits: int):
  """Codes ``[K, N]`` (ints in [0, 2**bits)) -> ``qweight [K * bits / 32, N]`` int32. Each value
  is masked to its ``bits`` (``check_range`` refuses out-of-range codes before packing)."""
  k = q.shape[0]
  check_length(k, bits, "the input dimension")
  nvals, nwords = run_shape(bits)
  v = jnp.asarray(q).astype(jnp.uint32) & jnp.uint32(2**bits - 1)
  v = v.reshape((k // nvals, nvals) + q.shape[1:])
  packed = _pack_runs(v, bits).reshape((k // nvals * nwords,) + q.shape[1:])
  return jax.lax.bitcast_convert_type(packed, jnp.int32)


def unpack_rows(packed, bits: int):
  """``qweight [K * bits / 32, N]`` int32 -> codes ``[K, N]`` int32."""
  nvals, nwords = run_shape(bits)
  rows = packed.shape[0]
  if rows % nwords:
    raise ValueError(f"{rows} packed rows is not a multiple of {nwords} ({bits}-bit runs)")
  w = jax.lax.bitcast_convert_type(jnp.asarray(packed, jnp.int32), jnp.uint32)
  w = w.reshape((rows // nwords, nwords) + packed.shape[1:])
  v = _unpack_runs(w, bits).reshape((rows // nwords * nvals,) + packed.shape[1:])
  return v.astype(jnp.int32)


def pack_cols(z, bits: int):
  """``[G, N]`` -> ``[G, N * bits / 32]`` int32, packed along the last axis (qzeros)."""
  check_length(z.shape[-1], bits, "the output dimension")
  return pack_rows(jnp.asarray(z).T, bits).T


def unpack_cols(packed, bits: int):
  return unpack_rows(jnp.asarray(packed).T, bits).T


def encode_zeros(zeros, bits: int, format: str):
  """Integer zero points -> the stored field: v1 stores ``z - 1`` (uint32 wrap), v2 stores ``z``."""
  zeros = jnp.asarray(zeros, jnp.int32)
  if format == "gptq":
    zeros = (zeros - 1) & (2**bits - 1)
  elif format != "gptq_v2":
    raise ValueError(f"format={format!r} is not a GPTQ checkpoint format: use 'gptq' or 'gptq_v2'")
  return zeros


def decode_zeros(stored, bits: int, format: str):
  """The stored field -> integer zero points (v1: ``stored + 1``, as every v1 reader does)."""
  del bits
  stored = jnp.asarray(stored, jnp.int32)
  if format == "gptq":
    return stored + 1
  if format != "gptq_v2":
    raise ValueError(f"format={format!r} is not a GPTQ checkpoint format: use 'gptq' or 'gptq_v2'")
  return stored


def check_v1_zeros(zeros) -> None:
  """v1 cannot store a zero point of 0 (it would read back as 2**bits): refuse, never corrupt."""
  if isinstance(zeros, jax.core.Tracer):
    return  # traced: checked when the values are concrete
  bad = int(np.sum(np.asarray(zeros) == 0))
  if bad:
    raise ValueError(
        f"{bad} zero point(s) are 0, which format='gptq' (v1 stores zero - 1) cannot represent; "
        "pack with format='gptq_v2', or quantize with GPTQConfig(format='gptq') which keeps "
        "asymmetric zero points >= 1")

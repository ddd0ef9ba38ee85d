"""Quantized weights as pytrees: ``QuantizedWeight`` (codes unpacked) and ``PackedWeight`` (HF layout).

Both are ``flax.struct`` dataclasses: arrays are pytree leaves, ``bits`` / ``group_size`` /
``format`` are static metadata, so they pass through ``jit``, ``shard_map`` and orbax untouched.
Dequantization everywhere is ``K[k, n] = scales[g_idx[k], n] * (q[k, n] - zeros[g_idx[k], n])``.

A mixture-of-experts layer keeps one weight per expert stacked on a leading axis (every field
``[E, ...]``, ``stack_weights``); ``dequantize``, ``pack`` and ``unpack`` work on such stacks
expert by expert (``dequantize`` -> ``[E, in, out]``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from gptq_jax.core import packing


@functools.partial(jax.jit, static_argnums=4)
def _dequantize(codes, scales, zeros, g_idx, dtype):
  s = jnp.take(scales, g_idx, axis=0).astype(jnp.float32)  # [in, out]
  z = jnp.take(zeros, g_idx, axis=0).astype(jnp.float32)
  return (s * (codes.astype(jnp.float32) - z)).astype(dtype)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _pack(codes, zeros, bits: int, format: str):
  stored = packing.encode_zeros(zeros, bits, format)
  return packing.pack_rows(codes, bits), packing.pack_cols(stored, bits)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _unpack(qweight, qzeros, bits: int, format: str):
  codes = packing.unpack_rows(qweight, bits)
  zeros = packing.decode_zeros(packing.unpack_cols(qzeros, bits), bits, format)
  return codes, zeros


@struct.dataclass
class QuantizedWeight:
  """One quantized linear layer, Flax layout, integer codes unpacked.

  codes:  [in, out] uint8, in [0, 2**bits - 1]
  scales: [groups, out] float32
  zeros:  [groups, out] int32 (the integer zero point, not the v1-stored ``z - 1``)
  g_idx:  [in] int32, the group of each input row (non-monotone only with act-order)
  """

  codes: jax.Array
  scales: jax.Array
  zeros: jax.Array
  g_idx: jax.Array
  bits: int = struct.field(pytree_node=False)
  group_size: int = struct.field(pytree_node=False)

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.codes.shape)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """The dequantized kernel ``[in, out]`` in the original column order."""
    if self.codes.ndim == 3:  # stacked experts
      return jax.vmap(lambda w: w.dequantize(dtype))(self)
    return _dequantize(self.codes, self.scales, self.zeros, self.g_idx, jnp.dtype(dtype))

  def pack(self, format: str = "gptq") -> "PackedWeight":
    """The Hugging Face GPTQ layout (docs/format.md) for ``format`` in {gptq, gptq_v2}.

    Scales keep their dtype (float32 here, so packing is lossless); the Hugging Face export writes
    them as float16 as the format prescribes.
    """
    if self.codes.ndim == 3:  # stacked experts
      return stack_weights([w.pack(format) for w in unstack_weights(self)])
    packing.check_range(self.codes, self.bits, "codes")
    if format == "gptq":
      packing.check_v1_zeros(self.zeros)  # v1 stores zero - 1: zeros in [1, 2**bits]
    else:
      packing.check_range(self.zeros, self.bits, "zero points")
    packing.encode_zeros(0, self.bits, format)  # validates the format name
    packing.run_shape(self.bits)
    for dim, what in ((self.codes.shape[0], "the input dimension"),
                      (self.codes.shape[1], "the output dimension")):
      packing.check_length(dim, self.bits, what)
    qweight, qzeros = _pack(self.codes, self.zeros, self.bits, format)
    return PackedWeight(
        qweight=qweight,
        qzeros=qzeros,
        scales=self.scales,
        g_idx=jnp.asarray(self.g_idx, jnp.int32),
        bits=self.bits,
        group_size=self.group_size,
        format=format,
    )


@struct.dataclass
class PackedWeight:
  """One linear layer in the Hugging Face GPTQ layout (K = in, N = out, b = bits, G = groups).

  qweight: [K * b / 32, N] int32, packed along the input dimension
  qzeros:  [G, N * b / 32] int32, packed along the output dimension (v1 stores zero - 1)
  scales:  [G, N] float
  g_idx:   [K] int32
  """

  qweight: jax.Array
  qzeros: jax.Array
  scales: jax.Array
  g_idx: jax.Array
  bits: int = struct.field(pytree_node=False)
  group_size: int = struct.field(pytree_node=False)
  format: str = struct.field(pytree_node=False, default="gptq")

  @property
  def in_features(self) -> int:
    return self.g_idx.shape[-1]

  @property
  def out_features(self) -> int:
    return self.scales.shape[-1]

  @property
  def shape(self) -> tuple[int, int]:
    return (self.in_features, self.out_features)

  def zeros(self) -> jax.Array:
    """Integer zero points ``[G, N]`` (the v1 ``+1`` applied)."""
    return _unpack(self.qweight, self.qzeros, self.bits, self.format)[1]

  def unpack(self) -> QuantizedWeight:
    if self.qweight.ndim == 3:  # stacked experts
      return stack_weights([w.unpack() for w in unstack_weights(self)])
    codes, zeros = _unpack(self.qweight, self.qzeros, self.bits, self.format)
    return QuantizedWeight(
        codes=codes.astype(jnp.uint8),
        scales=self.scales,
        zeros=zeros,
        g_idx=self.g_idx,
        bits=self.bits,
        group_size=self.group_size,
    )

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """The dequantized kernel ``[in, out]`` (``[E, in, out]`` for stacked experts)."""
    if self.qweight.ndim == 3:
      return jax.vmap(lambda w: w.dequantize(dtype))(self)
    codes, zeros = _unpack(self.qweight, self.qzeros, self.bits, self.format)
    return _dequantize(codes, self.scales, zeros, self.g_idx, jnp.dtype(dtype))


def packed_columns(w: PackedWeight, lo: int, hi: int) -> PackedWeight:
  """Output columns ``lo:hi`` of a packed weight (both multiples of the packing run, e.g. 8 for
  4 bits, 32 for 3 bits): the same codes, scales and zero points, still packed."""
  nvals, nwords = packing.run_shape(w.bits)
  if lo % nvals or (hi % nvals and hi != w.out_features):
    raise ValueError(f"columns {lo}:{hi} of a {w.bits}-bit packed weight: the bounds must be "
                     f"multiples of {nvals}")
  return PackedWeight(qweight=w.qweight[:, lo:hi], qzeros=w.qzeros[:, lo // nvals * nwords:
                                                                     -(-hi // nvals) * nwords],
                      scales=w.scales[:, lo:hi], g_idx=w.g_idx, bits=w.bits,
                      group_size=w.group_size, format=w.format)


def concat_columns(pieces: list[PackedWeight]) -> PackedWeight:
  """Packed weights of the same input rows and settings side by side (``packed_columns``'s
  inverse; every piece but the last a whole number of packing runs wide)."""
  import numpy as np  # noqa: PLC0415 (host arrays: the pieces may come from the host)

  first = pieces[0]
  cat = lambda f: np.concatenate([np.asarray(getattr(p, f)) for p in pieces], axis=1)  # noqa: E731
  return PackedWeight(qweight=cat("qweight"), qzeros=cat("qzeros"), scales=cat("scales"),
                      g_idx=np.asarray(first.g_idx), bits=first.bits,
                      group_size=first.group_size, format=first.format)


def stack_weights(weights):
  """Per-expert weights of one type and shape -> one weight whose fields have a leading expert
  axis (the layout of a mixture-of-experts layer's stacked experts)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *weights)


def unstack_weights(stacked) -> list:
  """The inverse of ``stack_weights``: one weight per expert."""
  n = jax.tree.leaves(stacked)[0].shape[0]
  return [jax.tree.map(lambda a, e=e: a[e], stacked) for e in range(n)]

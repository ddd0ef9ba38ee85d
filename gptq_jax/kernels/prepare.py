"""``prepare_for_kernel``: a packed GPTQ weight made kernel-ready once, at load.

The Hugging Face layout (``PackedWeight``) stays the export format, untouched. For inference the
kernel wants (a) rows whose groups are contiguous and monotone, and (b) integer zero points that
are not bit-packed along the output dimension (a lane shuffle inside a kernel). ``PreparedWeight``
is that: for an act-order checkpoint (non-monotone ``g_idx``) the packed rows are reordered once so
``g_idx`` becomes ``i // group_size``, and the activations are permuted by ``perm`` at run time
(exllama's approach) instead of gathering scales per row. Same bytes for the weights; zeros take
one scales-dtype value per group and column (``1 / group_size`` of the weight count).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gptq_jax.core import packing
from gptq_jax.core.weights import PackedWeight, QuantizedWeight
from gptq_jax.kernels.layout import effective_group_size


@struct.dataclass
class PreparedWeight:
  """A GPTQ linear layer ready for ``quantized_matmul`` (K = in, N = out, G = groups).

  qweight: [K * bits / 32, N] int32, rows in kernel order (groups contiguous and monotone)
  scales:  [G, N] float
  zeros:   [G, N] float (scales' dtype, or float32 for non-float scales): integer zero points
  perm:    [K] int32 or None: kernel row i is original input row perm[i], so
           ``x[..., perm] @ W_kernel == x @ W``; None when the rows are already in natural order.
  """

  qweight: jax.Array
  scales: jax.Array
  zeros: jax.Array
  perm: jax.Array | None
  bits: int = struct.field(pytree_node=False)
  group_size: int = struct.field(pytree_node=False)

  @property
  def in_features(self) -> int:
    return self.qweight.shape[0] * 32 // self.bits

  @property
  def out_features(self) -> int:
    return self.scales.shape[-1]

  @property
  def shape(self) -> tuple[int, int]:
    return (self.in_features, self.out_features)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """The dequantized kernel ``[in, out]`` in the original row order."""
    k = self.in_features
    gs = effective_group_size(self.group_size, k)
    codes = packing.unpack_rows(self.qweight, self.bits).astype(jnp.float32)  # kernel order
    g = jnp.arange(k) // gs
    w = (codes - self.zeros[g].astype(jnp.float32)) * self.scales[g].astype(jnp.float32)
    if self.perm is not None:
      w = jnp.zeros_like(w).at[self.perm].set(w)
    return w.astype(dtype)


def decoded_zeros(w: PackedWeight) -> jax.Array:
  """Integer zero points ``[G, N]`` as floats (scales' dtype), decoded from ``qzeros`` alone.
  Host (NumPy) zeros of 2/4/8 bits are decoded with NumPy (loading a checkpoint compiles
  nothing per weight shape)."""
  zdt = w.scales.dtype if jnp.issubdtype(w.scales.dtype, jnp.floating) else jnp.float32
  if isinstance(w.qzeros, np.ndarray) and 32 % w.bits == 0:
    nvals = 32 // w.bits
    words = w.qzeros.astype(np.int64) & 0xFFFFFFFF  # [G, N / nvals]
    shifts = np.arange(nvals, dtype=np.int64) * w.bits
    z = ((words[..., None] >> shifts) & (2**w.bits - 1)).reshape(words.shape[0], -1)
    z = z + 1 if w.format == "gptq" else z  # v1 stores zero - 1
    return jax.device_put(z.astype(np.dtype(zdt)))
  return _decode_zeros(w.qzeros, w.bits, w.format).astype(zdt)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _decode_zeros(qzeros, bits: int, format: str):
  return packing.decode_zeros(packing.unpack_cols(qzeros, bits), bits, format)


@functools.partial(jax.jit, static_argnums=2)
def _reorder_rows(qweight, perm, bits: int):
  """Packed rows permuted: kernel row i holds input row perm[i]."""
  return packing.pack_rows(jnp.take(packing.unpack_rows(qweight, bits), perm, axis=0), bits)


def trivial_g_idx(g_idx: jax.Array, group_size: int) -> jax.Array:
  """Whether ``g_idx == arange(K) // group_size`` (a traced bool; jit-friendly)."""
  k = g_idx.shape[0]
  gs = effective_group_size(group_size, k)
  return jnp.all(g_idx == jnp.arange(k, dtype=g_idx.dtype) // gs)


def is_natural(g_idx, group_size: int) -> bool:
  """``trivial_g_idx`` for a concrete ``g_idx``, on the host."""
  g_idx = np.asarray(g_idx)
  k = g_idx.shape[0]
  return bool(np.array_equal(g_idx, np.arange(k) // effective_group_size(group_size, k)))


def prepare_for_kernel(w: PackedWeight | QuantizedWeight | PreparedWeight) -> PreparedWeight:
  """Make ``w`` kernel-ready (once, at load). Idempotent on a ``PreparedWeight``.

  With concrete arrays the act-order structure is checked: after sorting by ``g_idx`` every group
  must be contiguous with ``group_size`` rows (true of every GPTQ checkpoint); anything else
  raises. Under ``jit`` (traced ``g_idx``) that check is skipped and the rows are always
  reordered (``perm`` is then never None, so ``x`` is gathered on every call: prefer preparing
  eagerly).
  """
  if isinstance(w, PreparedWeight):
    return w
  if isinstance(w, QuantizedWeight):
    w = w.pack("gptq_v2")
  if not isinstance(w, PackedWeight):
    raise TypeError(f"prepare_for_kernel takes a PackedWeight, QuantizedWeight or PreparedWeight, "
                    f"not {type(w).__name__}")
  k = w.in_features
  gs = effective_group_size(w.group_size, k)
  zeros = decoded_zeros(w)
  if not isinstance(w.g_idx, jax.core.Tracer):
    g_idx = np.asarray(w.g_idx)
    natural = np.arange(k) // gs
    if np.array_equal(g_idx, natural):
      return PreparedWeight(qweight=w.qweight, scales=w.scales, zeros=zeros, perm=None,
                            bits=w.bits, group_size=w.group_size)
    perm = np.argsort(g_idx, kind="stable")
    if not np.array_equal(g_idx[perm], natural):
      sizes = np.bincount(g_idx, minlength=w.scales.shape[0])
      raise ValueError(
          f"g_idx cannot be made contiguous: after sorting, groups must hold group_size="
          f"{w.group_size} rows each (the last may be shorter) but have sizes {sizes.tolist()}; "
          "such a weight runs only on the XLA path: pass the PackedWeight itself to "
          "quantized_matmul (backend='xla')")
    perm = jnp.asarray(perm, jnp.int32)
  else:
    perm = jnp.argsort(w.g_idx, stable=True).astype(jnp.int32)
  qweight = _reorder_rows(w.qweight, perm, w.bits)
  return PreparedWeight(qweight=qweight, scales=w.scales, zeros=zeros, perm=perm, bits=w.bits,
                        group_size=w.group_size)


def _is_weight(a: Any) -> bool:
  return isinstance(a, (PackedWeight, QuantizedWeight, PreparedWeight))


def _is_2d(a: Any) -> bool:
  """A single linear layer's weight (MoE experts stacked on a leading axis stay as they are: the
  grouped matmul dequantizes them one expert at a time, kernels/grouped.py)."""
  return jax.tree.leaves(a)[0].ndim == 2


def prepare_params(params: Any) -> Any:
  """Every ``PackedWeight`` / ``QuantizedWeight`` leaf of a parameter pytree, made kernel-ready."""
  return jax.tree.map(lambda a: prepare_for_kernel(a) if _is_weight(a) and _is_2d(a) else a,
                      params, is_leaf=_is_weight)

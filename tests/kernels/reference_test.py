"""The oracle against the core dequantization, and the XLA path against the oracle."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptq_jax.kernels import PreparedWeight, prepare_for_kernel, quantized_matmul, reference_matmul
from gptq_jax.kernels.reference import xla_chunk_size
from tests.kernels.helpers import assert_matmul_close, make_quantized, make_rtn, make_x


def _numpy_dequantize(q) -> np.ndarray:
  g = np.asarray(q.g_idx)
  s = np.asarray(q.scales, np.float64)[g]
  z = np.asarray(q.zeros, np.float64)[g]
  return s * (np.asarray(q.codes, np.float64) - z)


@pytest.mark.parametrize("bits,fmt,act_order", [
    (2, "gptq", False), (3, "gptq_v2", True), (4, "gptq", True), (8, "gptq_v2", False)])
def test_reference_equals_core_dequantize(bits, fmt, act_order):
  q = make_quantized(128, 64, bits, 32, act_order=act_order, seed=bits)
  packed = q.pack(fmt)
  w = _numpy_dequantize(q)
  np.testing.assert_allclose(np.asarray(q.dequantize()), w, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(packed.dequantize()), w, rtol=1e-6)
  x = make_x((5, 128))
  y = reference_matmul(x, packed)
  assert y.dtype == jnp.float32
  assert_matmul_close(y, x, w)


# Every width x group size x act-order, each with one of the batch sizes (a covering subset).
XLA_CASES = [(b, g, a, m) for (b, g, a), m in zip(
    itertools.product((2, 3, 4, 8), (32, 128, -1), (False, True)), itertools.cycle((1, 7, 64)))]


@pytest.mark.parametrize("bits,group_size,act_order,m", XLA_CASES)
def test_xla_path_equals_reference(bits, group_size, act_order, m):
  fmt = "gptq" if m % 2 else "gptq_v2"
  q = make_quantized(256, 96, bits, group_size, act_order=act_order, seed=m)
  packed = q.pack(fmt)
  w = _numpy_dequantize(q)
  x = make_x((m, 256), seed=bits)
  prepared = prepare_for_kernel(packed)
  assert (prepared.perm is None) == (not act_order or group_size == -1)
  assert_matmul_close(quantized_matmul(x, prepared, backend="xla"), x, w)
  # The raw PackedWeight inside jit: act-order is checked at run time (lax.cond).
  traced = jax.jit(lambda x, p: quantized_matmul(x, p, backend="xla"))(x, packed)
  assert_matmul_close(traced, x, w)


@pytest.mark.parametrize("act_order", [False, True])
def test_raw_packed_weight_checked_eagerly(act_order):
  q = make_quantized(128, 64, 4, 32, act_order=act_order)
  x = make_x((3, 128))
  assert_matmul_close(quantized_matmul(x, q.pack(), backend="xla"), x, _numpy_dequantize(q))


def test_xla_path_partial_last_group_bf16_and_f16_scales():
  q = make_quantized(576, 64, 4, 128, seed=3, scales_dtype=jnp.float16)  # 576 = 4.5 groups
  packed = q.pack()
  w = _numpy_dequantize(q)
  x = make_x((3, 2, 576), jnp.bfloat16)
  y = quantized_matmul(x, packed, backend="xla")
  assert y.dtype == jnp.bfloat16 and y.shape == (3, 2, 64)
  assert_matmul_close(y, x, w)
  prepared = prepare_for_kernel(packed)
  assert prepared.zeros.dtype == jnp.float16
  assert_matmul_close(quantized_matmul(x.astype(jnp.float32), prepared, backend="xla"),
                      x.astype(jnp.float32), w)


def test_xla_path_on_rtn_weights_both_formats():
  q = make_rtn(256, 128, 4, 64)
  x = make_x((7, 256))
  for fmt in ("gptq", "gptq_v2"):
    if fmt == "gptq" and bool(jnp.any(q.zeros == 0)):
      continue  # v1 cannot store zero point 0 (packing refuses); v2 covers it
    assert_matmul_close(quantized_matmul(x, q.pack(fmt), backend="xla"), x, q.dequantize())


def test_prepare_for_kernel_reorders_act_order_rows():
  q = make_quantized(256, 64, 4, 64, act_order=True, seed=5)
  packed = q.pack()
  prepared = prepare_for_kernel(packed)
  assert isinstance(prepared, PreparedWeight)
  np.testing.assert_array_equal(np.sort(np.asarray(prepared.perm)), np.arange(256))
  # Kernel row i is input row perm[i], and its group is i // group_size (monotone).
  g_sorted = np.asarray(q.g_idx)[np.asarray(prepared.perm)]
  np.testing.assert_array_equal(g_sorted, np.arange(256) // 64)
  np.testing.assert_allclose(np.asarray(prepared.dequantize()), _numpy_dequantize(q), rtol=1e-6)
  assert prepare_for_kernel(prepared) is prepared
  natural = prepare_for_kernel(make_quantized(256, 64, 4, 64).pack())
  assert natural.perm is None
  from_quantized = prepare_for_kernel(q)
  np.testing.assert_array_equal(np.asarray(from_quantized.qweight), np.asarray(prepared.qweight))
  traced = jax.jit(prepare_for_kernel)(packed)
  np.testing.assert_allclose(np.asarray(traced.dequantize()), _numpy_dequantize(q), rtol=1e-6)


def test_prepare_for_kernel_refuses_uneven_groups():
  q = make_quantized(128, 32, 4, 32)
  g_idx = np.asarray(q.g_idx).copy()
  g_idx[:40] = 0  # group 0 now has 40 rows, group 1 only 24
  bad = q.replace(g_idx=jnp.asarray(g_idx)).pack()
  with pytest.raises(ValueError, match="group_size=32"):
    prepare_for_kernel(bad)
  x = make_x((2, 128))  # ... and the raw weight still runs (gather path)
  assert_matmul_close(quantized_matmul(x, bad, backend="xla"), x, _numpy_dequantize(bad.unpack()))


def test_xla_chunk_size():
  assert xla_chunk_size(4096, 128, 4) == 128
  assert xla_chunk_size(576, 128, 4) == 64  # partial last group: chunks must fit in a group
  assert xla_chunk_size(576, -1, 4) == 96
  assert xla_chunk_size(11008, 128, 3) == 128
  assert xla_chunk_size(4096, 128, 4, target=256) == 256
  assert xla_chunk_size(256, 16, 3) is None  # 16-row groups inside 32-value 3-bit runs


@pytest.mark.parametrize("bits,group_size,k", [(4, 128, 576), (2, 64, 256), (8, -1, 192),
                                               (4, 256, 128)])
def test_xla_rows_path_for_one_or_two_rows(bits, group_size, k, monkeypatch):
  """Decoding's one or two rows take _xla_rows on CPU (codes never stored): a partial last group,
  one group over all rows, a group wider than K; the same weight at 7 rows takes the scan."""
  from gptq_jax.kernels import reference  # noqa: PLC0415

  calls = []
  rows_path = reference._xla_rows
  monkeypatch.setattr(reference, "_xla_rows", lambda x, w: calls.append(x.shape[0]) or
                      rows_path(x, w))
  q = make_quantized(k, 48, bits, group_size, seed=k, scales_dtype=jnp.float16)
  w = _numpy_dequantize(q)
  prepared = prepare_for_kernel(q.pack())
  for m in (1, 2, 7):
    x = make_x((m, k), seed=m)
    assert_matmul_close(jax.jit(lambda x, p: quantized_matmul(x, p, backend="xla"))(x, prepared),
                        x, w)
  assert calls == [1, 2], calls


@pytest.mark.parametrize("bits,fmt", [(2, "gptq"), (4, "gptq_v2"), (4, "gptq"), (8, "gptq_v2")])
def test_host_zero_decoding_equals_the_jitted_one(bits, fmt):
  """A checkpoint's NumPy qzeros are decoded on the host (no compile per shape): same numbers."""
  from gptq_jax.kernels.prepare import _decode_zeros, decoded_zeros  # noqa: PLC0415

  packed = make_rtn(128, 64, bits, 32).pack(fmt)
  host = jax.tree.map(np.asarray, packed)
  assert isinstance(host.qzeros, np.ndarray)
  want = np.asarray(_decode_zeros(packed.qzeros, bits, fmt))
  np.testing.assert_array_equal(np.asarray(decoded_zeros(host)), want)

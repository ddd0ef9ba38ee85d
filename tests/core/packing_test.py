"""Packing: bit-exact round trips, the 3-bit word layout, v1/v2 zero conventions."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gptq_jax import PackedWeight, QuantizedWeight
from gptq_jax.core import packing


def _stream_pack(values, bits):
  """Independent oracle: a Python-int little-endian bit stream cut into 32-bit words."""
  out = []
  per_run = 32 if bits == 3 else 32 // bits
  for r in range(0, len(values), per_run):
    stream = 0
    for j, v in enumerate(values[r:r + per_run]):
      stream |= int(v) << (bits * j)
    for w in range(per_run * bits // 32):
      out.append((stream >> (32 * w)) & 0xFFFFFFFF)
  return np.array(out, np.uint64).astype(np.uint32).view(np.int32)


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), runs=st.integers(1, 4), n=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1))
def test_rows_round_trip_and_match_bit_stream(bits, runs, n, seed):
  k = runs * (32 if bits == 3 else 32 // bits)
  q = np.random.default_rng(seed).integers(0, 2**bits, size=(k, n))
  packed = np.asarray(packing.pack_rows(q, bits))
  assert packed.dtype == np.int32 and packed.shape == (k * bits // 32, n)
  for col in range(n):
    np.testing.assert_array_equal(packed[:, col], _stream_pack(q[:, col], bits))
  np.testing.assert_array_equal(np.asarray(packing.unpack_rows(packed, bits)), q)


def test_three_bit_word_layout_by_hand():
  v = np.arange(32) % 8  # v_j = j mod 8
  w = np.asarray(packing.pack_rows(v[:, None], 3))[:, 0].view(np.uint32)
  w0 = sum(int(v[j]) << (3 * j) for j in range(10)) | ((int(v[10]) & 3) << 30)
  w1 = (int(v[10]) >> 2) | sum(int(v[11 + j]) << (3 * j + 1) for j in range(10)) | (
      (int(v[21]) & 1) << 31)
  w2 = (int(v[21]) >> 1) | sum(int(v[22 + j]) << (3 * j + 2) for j in range(10))
  assert [int(x) for x in w] == [w0 & 0xFFFFFFFF, w1 & 0xFFFFFFFF, w2 & 0xFFFFFFFF]


def test_v1_symmetric_4bit_qzeros_known_answer():
  zeros = np.full((3, 16), 8)
  stored = packing.pack_cols(packing.encode_zeros(zeros, 4, "gptq"), 4)
  assert np.asarray(stored).view(np.uint32).tolist() == [[0x77777777] * 2] * 3
  v2 = packing.pack_cols(packing.encode_zeros(zeros, 4, "gptq_v2"), 4)
  assert np.asarray(v2).view(np.uint32).tolist() == [[0x88888888] * 2] * 3


def _random_qw(bits, k=64, n=32, group_size=16, seed=0, act_order=False):
  rng = np.random.default_rng(seed)
  g = -(-k // group_size)
  g_idx = np.arange(k) // group_size
  if act_order:
    g_idx = rng.permutation(g_idx)
  return QuantizedWeight(
      codes=rng.integers(0, 2**bits, (k, n)).astype(np.uint8),
      scales=rng.uniform(0.001, 0.1, (g, n)).astype(np.float32),
      zeros=rng.integers(1, 2**bits, (g, n)).astype(np.int32),
      g_idx=g_idx.astype(np.int32), bits=bits, group_size=group_size)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_quantized_weight_pack_round_trip(bits, fmt):
  qw = _random_qw(bits, act_order=True)
  p = qw.pack(fmt)
  assert isinstance(p, PackedWeight) and p.format == fmt
  assert p.qweight.shape == (64 * bits // 32, 32) and p.qzeros.shape == (4, 32 * bits // 32)
  assert p.qweight.dtype == np.int32 and p.qzeros.dtype == np.int32
  back = p.unpack()
  for name in ("codes", "scales", "zeros", "g_idx"):
    np.testing.assert_array_equal(np.asarray(getattr(back, name)), np.asarray(getattr(qw, name)))
  np.testing.assert_array_equal(np.asarray(p.dequantize()), np.asarray(qw.dequantize()))
  # a pytree with static metadata: survives jit
  np.testing.assert_array_equal(jax.jit(lambda x: x.dequantize())(p), p.dequantize())


def test_v1_refuses_zero_point_zero_and_v2_keeps_it():
  qw = _random_qw(4)
  qw = qw.replace(zeros=np.asarray(qw.zeros).copy())
  qw.zeros[1, 3] = 0
  with pytest.raises(ValueError, match="1 zero point"):
    qw.pack("gptq")
  np.testing.assert_array_equal(np.asarray(qw.pack("gptq_v2").zeros()), qw.zeros)


def test_shapes_that_cannot_pack_are_refused():
  with pytest.raises(ValueError, match="multiple of 32"):
    packing.pack_rows(np.zeros((48, 4), np.int32), 3)
  with pytest.raises(ValueError, match="bits must be one of"):
    packing.pack_rows(np.zeros((32, 4), np.int32), 5)
  with pytest.raises(ValueError, match="not a GPTQ checkpoint format"):
    packing.encode_zeros(np.ones((2, 8)), 4, "awq")


@pytest.mark.parametrize("bits", [3, 4])
def test_packed_columns_split_and_join_a_weight(bits):
  """Slices of the output columns (a head read a slice of the vocabulary at a time) hold the
  slices' codes and grids, and side by side they are the whole weight again."""
  from gptq_jax.core.weights import concat_columns, packed_columns

  rng = np.random.default_rng(bits)
  k, n = 64, 96
  qw = QuantizedWeight(codes=rng.integers(0, 2**bits, (k, n)).astype(np.uint8),
                       scales=rng.random((2, n), dtype=np.float32) + 0.1,
                       zeros=rng.integers(1, 2**bits, (2, n)).astype(np.int32),
                       g_idx=rng.permutation(np.arange(k) // 32).astype(np.int32), bits=bits,
                       group_size=32)
  whole = qw.pack("gptq")
  dense = np.asarray(whole.dequantize())
  bounds = [(0, 32), (32, 64), (64, 96)]
  pieces = [packed_columns(whole, lo, hi) for lo, hi in bounds]
  for (lo, hi), p in zip(bounds, pieces):
    np.testing.assert_array_equal(np.asarray(p.dequantize()), dense[:, lo:hi])
    np.testing.assert_array_equal(np.asarray(p.unpack().codes), np.asarray(qw.codes)[:, lo:hi])
  joined = concat_columns(pieces)
  for f in ("qweight", "qzeros", "scales", "g_idx"):
    np.testing.assert_array_equal(np.asarray(getattr(joined, f)), np.asarray(getattr(whole, f)))
  with pytest.raises(ValueError, match="multiples of"):
    packed_columns(whole, 4, 40)

"""The grid: reference find_params semantics, RTN, and the clipping search."""

import jax.numpy as jnp
import numpy as np
import pytest

from gptq_jax import GPTQConfig, rtn_quantize
from gptq_jax.core import quantizer
from tests.core import reference_gptq as ref


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_fit_grid_matches_reference(bits, sym):
  rng = np.random.default_rng(bits)
  x = (rng.standard_t(3, size=(64, 40)) * 0.1).astype(np.float32)
  x[0] = np.abs(x[0])  # no negative value: the reference keeps xmin = 0 (also when symmetric)
  x[1] = 0.0  # all zero: range [-1, 1]
  x[2] = -np.abs(x[2])
  s, z = quantizer.fit_grid(jnp.asarray(x), bits=bits, sym=sym)
  q = ref.Quantizer(bits, sym).find_params(x)
  np.testing.assert_array_equal(np.asarray(s), q.scale)
  np.testing.assert_array_equal(np.asarray(z), q.zero)
  codes = quantizer.quantize_codes(x, s[:, None], z[:, None], 2**bits - 1)
  ref_codes = np.stack([q.codes(x[:, j]) for j in range(x.shape[1])], 1)
  np.testing.assert_array_equal(np.asarray(codes), ref_codes)


def test_round_half_to_even():
  s, z = jnp.float32(1.0), jnp.float32(8.0)
  x = jnp.array([0.5, 1.5, 2.5, -0.5, -1.5], jnp.float32)
  assert quantizer.quantize_codes(x, s, z, 15).tolist() == [8, 10, 10, 8, 6]


def _clip_err(x, s, z, maxq, p):
  return np.sum(np.abs(np.asarray(quantizer.fake_quantize(x, s[:, None], z[:, None], maxq)) - x)
                ** p, axis=1)


@pytest.mark.parametrize("sym", [True, False])
def test_clipping_search_never_worse_per_row(sym):
  rng = np.random.default_rng(0)
  x = (rng.standard_t(2, size=(256, 128)) * 0.02).astype(np.float32)
  s0, z0 = quantizer.fit_grid(x, bits=4, sym=sym)
  s1, z1 = quantizer.fit_grid(x, bits=4, sym=sym, mse=2.4)
  e0, e1 = _clip_err(x, s0, z0, 15, 2.4), _clip_err(x, s1, z1, 15, 2.4)
  assert np.all(e1 <= e0 * (1 + 1e-6))
  assert np.mean(e1 < e0) > 0.5  # heavy tails: most rows prefer a clipped range


def test_rtn_output_error_falls_with_clipping_search():
  rng = np.random.default_rng(1)
  kernel = (rng.standard_t(2, size=(256, 64)) * 0.02).astype(np.float32)
  x = rng.normal(size=(512, 256)).astype(np.float32)
  err = lambda qw: float(np.sum((x @ (kernel - np.asarray(qw.dequantize())))**2))
  plain = rtn_quantize(kernel, GPTQConfig(4))
  clipped = rtn_quantize(kernel, GPTQConfig(4, mse=2.4))
  assert err(clipped) < 0.9 * err(plain)


def test_rtn_partial_group_and_per_channel():
  rng = np.random.default_rng(2)
  kernel = rng.normal(size=(576, 32)).astype(np.float32)
  qw = rtn_quantize(kernel, GPTQConfig(4, group_size=128))
  assert qw.scales.shape == (5, 32) and np.asarray(qw.g_idx)[-1] == 4
  tail = kernel[512:]  # the partial group's grid comes from its 64 rows only
  q = ref.Quantizer(4, True).find_params(tail.T)
  np.testing.assert_array_equal(np.asarray(qw.scales)[4], q.scale)
  per_col = rtn_quantize(kernel, GPTQConfig(4, group_size=-1))
  assert per_col.scales.shape == (1, 32)

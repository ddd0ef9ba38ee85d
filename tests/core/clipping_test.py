"""The clipping search (``mse``) of the grid fit, against the NumPy port of the reference's loop
(``tests/core/reference_gptq.py``)."""

import jax
import numpy as np
import pytest

import gptq_jax as gj
from gptq_jax.core import quantizer
from tests.core import reference_gptq as ref
from tests.core.helpers import layer_problem, output_error


def _groups(seed=0, rows=96, gs=128):
  """Heavy-tailed rows (Student-t, df 3) with a few outliers: where clipping pays."""
  rng = np.random.default_rng(seed)
  x = rng.standard_t(3, size=(rows, gs)).astype(np.float32) * 0.02
  x[rng.integers(0, rows, 8), rng.integers(0, gs, 8)] *= 6.0
  x[0] = np.abs(x[0])  # a row with no negative value (the reference keeps xmin = 0)
  return x


def _np_err(x, scale, zero, maxq, norm, weight=1.0):
  """``sum weight * |dequant(q) - x| ** norm`` per row, float64."""
  q = np.clip(np.round(x / scale[:, None]) + zero[:, None], 0, maxq)
  d = scale[:, None].astype(np.float64) * (q - zero[:, None]) - x
  return np.sum(weight * np.abs(d) ** norm, axis=1)


def _np_search(x, bits, sym, norm, weight=None):
  """The reference ``find_params(mse)``: the NumPy port's search, one candidate at a time."""
  q = ref.Quantizer(bits, sym).find_params(x, norm, weight)
  return q.scale, q.zero


@pytest.mark.parametrize("bits,sym,norm", [(4, True, 2.4), (3, False, 2.4), (2, True, 2.0),
                                           (4, False, 3.0)])
def test_search_never_increases_group_error_over_the_unclipped_grid(bits, sym, norm):
  x = _groups(bits)
  maxq = 2**bits - 1
  s0, z0 = (np.asarray(a) for a in quantizer.fit_grid(x, bits=bits, sym=sym))
  s1, z1 = (np.asarray(a) for a in quantizer.fit_grid(x, bits=bits, sym=sym, mse=norm))
  plain, clipped = _np_err(x, s0, z0, maxq, norm), _np_err(x, s1, z1, maxq, norm)
  assert np.all(clipped <= plain * (1 + 1e-5) + 1e-12)
  assert np.mean(clipped < plain * 0.99) > 0.3  # and it does clip: most heavy-tailed rows gain
  assert np.all(s1 <= s0 * (1 + 1e-6))  # only shrinks the range


@pytest.mark.parametrize("bits,sym", [(4, True), (3, False)])
def test_search_matches_the_reference_loop(bits, sym):
  x = _groups(10 + bits, rows=64)
  want_s, want_z = _np_search(x, bits, sym, 2.4)
  s, z = (np.asarray(a) for a in quantizer.fit_grid(x, bits=bits, sym=sym, mse=2.4))
  same = np.isclose(s, want_s, rtol=1e-6) & (z == want_z)
  assert np.mean(same) >= 0.95, np.mean(same)  # ties between candidates may break on the last bit
  maxq = 2**bits - 1
  np.testing.assert_allclose(_np_err(x, s, z, maxq, 2.4), _np_err(x, want_s, want_z, maxq, 2.4),
                             rtol=1e-3)


def test_weighted_search_minimises_the_weighted_error():
  """``weight`` (one per column) picks, per row, the candidate with the least weighted error: the
  reference loop's choice with weights, and different from the unweighted choice."""
  x = _groups(7, rows=64)
  w = np.exp(np.random.default_rng(1).normal(0, 1.5, x.shape[1]))  # heavy-tailed column weights
  want_s, want_z = _np_search(x, 4, True, 2.4, weight=w)
  s, z = (np.asarray(a) for a in quantizer.fit_grid(x, bits=4, sym=True, mse=2.4, weight=w))
  assert np.mean(np.isclose(s, want_s, rtol=1e-6) & (z == want_z)) >= 0.95
  s0, z0 = (np.asarray(a) for a in quantizer.fit_grid(x, bits=4, sym=True, mse=2.4))
  weighted = lambda s, z: _np_err(x, s, z, 15, 2.4, w)  # noqa: E731
  assert np.all(weighted(s, z) <= weighted(s0, z0) * (1 + 1e-5))
  assert np.mean(~np.isclose(s, s0, rtol=1e-6)) > 0.3  # the weights change most rows' choice


def test_search_is_vectorised_over_candidates():
  """The traced program does not grow with the number of candidates (no Python loop over them)."""
  x = _groups(0, rows=8)

  def n_eqns(grid):
    f = lambda a: quantizer.fit_grid(a, bits=4, sym=True, mse=2.4, grid=grid)
    return len(jax.make_jaxpr(f)(x).jaxpr.eqns)

  assert n_eqns(20) == n_eqns(100)


@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, 64)])
def test_rtn_with_clipping_search_lowers_layer_output_error(bits, group_size):
  X, kernel, _ = layer_problem(seed=3)  # Student-t weights (df 4): heavy tails
  plain = gj.rtn_quantize(kernel, gj.GPTQConfig(bits, group_size=group_size))
  clipped = gj.rtn_quantize(kernel, gj.GPTQConfig(bits, group_size=group_size, mse=2.4))
  e_plain = output_error(X, kernel, plain.dequantize())
  e_clip = output_error(X, kernel, clipped.dequantize())
  assert e_clip < 0.95 * e_plain, (e_clip, e_plain)
  # The same grid fit drives RTN: its scales are the searched ones, never wider than min/max.
  assert np.all(np.asarray(clipped.scales) <= np.asarray(plain.scales) * (1 + 1e-6))

"""Experts solved together (core/batched.py): one vmapped factorization and column loop for every
expert of a layer gives exactly the codes, grids and g_idx of one quantize_weight per expert."""

import numpy as np
import pytest

import gptq_jax as gj
from gptq_jax.core.batched import quantize_batched
from tests.core.helpers import layer_problem

E, K_IN = 5, 64
RNG = np.random.default_rng(2)
# Each expert its own Hessian (its own tokens), one of them indefinite at damp 0.01 (it escalates
# alone) and one with a dead input column; gate and up share each expert's Hessian.
HESSIANS = np.stack([layer_problem(seed=e, tokens=96 + 40 * e, k_in=K_IN)[2] for e in range(E)])
HESSIANS[1, 5, :] = HESSIANS[1, :, 5] = 0.0
HESSIANS[3] -= 0.3 * np.eye(K_IN, dtype=np.float32) * np.diag(HESSIANS[3]).mean()
GATE = (RNG.standard_t(4, size=(E, K_IN, 32)) * 0.05).astype(np.float32)
UP = (RNG.standard_t(4, size=(E, K_IN, 32)) * 0.05).astype(np.float32)


def _same(qw, e, want):
  for field in ("codes", "scales", "zeros", "g_idx"):
    np.testing.assert_array_equal(np.asarray(getattr(qw, field))[e],
                                  np.asarray(getattr(want, field)), err_msg=f"{field} expert {e}")


@pytest.mark.parametrize("kw", [
    dict(bits=4, group_size=32, damp_percent=0.01),  # GAR; expert 3 escalates its damping
    dict(bits=3, group_size=16, desc_act=True, sym=False, format="gptq_v2", static_groups=True,
         block_size=32, damp_percent=0.01),
])
def test_batched_solve_equals_one_solve_per_expert(kw):
  kw = dict(kw)
  cfg = gj.GPTQConfig(kw.pop("bits"), **kw)
  rtn = [False, False, False, False, True]  # expert 4: too few tokens
  out = quantize_batched([GATE, UP], HESSIANS, cfg, [f"e{e}" for e in range(E)], rtn=rtn,
                         chunk_bytes=3 * 4 * (4 * K_IN * K_IN + 3 * K_IN * 64))  # chunks of 3
  assert len(out) == 2
  for kernels, (qw, infos) in zip((GATE, UP), out):
    assert qw.codes.shape == (E, K_IN, 32) and len(infos) == E
    for e in range(E):
      if rtn[e]:
        _same(qw, e, gj.core.gptq.rtn_quantize(kernels[e], cfg))
        assert infos[e].fallback and np.isnan(infos[e].loss)
        continue
      with pytest.warns(UserWarning) if e == 3 else _nothing():
        want, info = gj.quantize_weight(kernels[e], HESSIANS[e], cfg, return_info=True)
      _same(qw, e, want)
      assert infos[e].damp == pytest.approx(info.damp) and not infos[e].fallback
      np.testing.assert_allclose(infos[e].loss, info.loss, rtol=1e-4)
  assert out[0][1][3].damp > cfg.damp_percent  # escalated, alone


def test_batched_solve_spread_over_devices_equals_one_device():
  """The experts split over 5 of the 8 test devices give one device's codes."""
  from gptq_jax.core.shared import solve_mesh  # noqa: PLC0415

  cfg = gj.GPTQConfig(4, group_size=32, damp_percent=0.2)
  one = quantize_batched([GATE], HESSIANS, cfg)
  spread = quantize_batched([GATE], HESSIANS, cfg, mesh=solve_mesh("on"))
  for field in ("codes", "scales", "zeros", "g_idx"):
    np.testing.assert_array_equal(np.asarray(getattr(spread[0][0], field)),
                                  np.asarray(getattr(one[0][0], field)), err_msg=field)


class _nothing:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

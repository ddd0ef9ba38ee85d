"""Hessian accumulation: streaming and masking against NumPy, sharded equals single-device."""

import jax
import numpy as np
import pytest

from gptq_jax.core import hessian


def _batches(seed=0, n=5, b=3, t=16, k=48):
  rng = np.random.default_rng(seed)
  xs = [rng.standard_t(3, size=(b, t, k)).astype(np.float32) for _ in range(n)]
  masks = [(rng.random((b, t)) > 0.3).astype(np.int32) for _ in range(n)]
  return xs, masks


def _numpy_h(xs, masks):
  x = np.concatenate([x.reshape(-1, x.shape[-1]) for x in xs]).astype(np.float64)
  m = np.concatenate([m.reshape(-1) for m in masks]).astype(bool)
  x = x[m]
  return 2.0 / len(x) * x.T @ x


def test_streaming_masked_matches_numpy():
  xs, masks = _batches()
  st = hessian.init(48)
  for x, m in zip(xs, masks):
    st = hessian.update(st, x, m)
  assert float(st.count) == sum(m.sum() for m in masks)
  np.testing.assert_allclose(hessian.finalize(st), _numpy_h(xs, masks), rtol=2e-5, atol=1e-5)


def test_padding_tokens_do_not_count():
  xs, masks = _batches(n=1)
  x = xs[0].copy()
  x[masks[0] == 0] = 1e6  # garbage in padded positions
  st = hessian.update(hessian.init(48), x, masks[0])
  np.testing.assert_allclose(hessian.finalize(st), _numpy_h(xs, masks), rtol=2e-5, atol=1e-5)


def test_state_buffer_is_donated():
  st = hessian.init(48)
  old = st.xtx
  hessian.update(st, np.ones((2, 48), np.float32))
  assert old.is_deleted()


@pytest.mark.parametrize("batch", [8, 5])  # 5: padded to the 8 devices with masked rows
def test_sharded_equals_single_device(batch):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",))
  xs, masks = _batches(b=batch)
  single, sharded = hessian.init(48), hessian.init(48)
  for x, m in zip(xs, masks):
    single = hessian.update(single, x, m)
    sharded = hessian.update_sharded(sharded, x, m, mesh=mesh)
  assert float(sharded.count) == float(single.count)
  np.testing.assert_allclose(hessian.finalize(sharded), hessian.finalize(single), rtol=1e-5,
                             atol=1e-6)


def test_errors():
  st = hessian.init(48)
  with pytest.raises(ValueError, match="48"):
    hessian.update(st, np.ones((2, 10), np.float32))
  with pytest.raises(ValueError, match="mask shape"):
    hessian.update(st, np.ones((2, 3, 48), np.float32), np.ones((2, 4)))
  with pytest.raises(ValueError, match="no calibration tokens"):
    hessian.finalize(hessian.update(hessian.init(4), np.ones((2, 4), np.float32),
                                    np.zeros((2,))))

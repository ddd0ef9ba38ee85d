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


def test_finalize_consumed_equals_finalize_and_takes_the_state():
  rng = np.random.default_rng(3)
  st = hessian.update(hessian.init(16), rng.standard_normal((3, 5, 16)).astype(np.float32))
  want = np.asarray(hessian.finalize(st))
  got = hessian.finalize_consumed(st)
  np.testing.assert_array_equal(np.asarray(got), want)  # the same arithmetic, bit for bit
  assert st.xtx.is_deleted()  # H was written over the running sum's buffer


def test_errors():
  st = hessian.init(48)
  with pytest.raises(ValueError, match="48"):
    hessian.update(st, np.ones((2, 10), np.float32))
  with pytest.raises(ValueError, match="mask shape"):
    hessian.update(st, np.ones((2, 3, 48), np.float32), np.ones((2, 4)))
  with pytest.raises(ValueError, match="no calibration tokens"):
    hessian.finalize(hessian.update(hessian.init(4), np.ones((2, 4), np.float32),
                                    np.zeros((2,))))


def test_the_sum_does_not_depend_on_how_the_samples_are_grouped():
  """GPTQ amplifies a 1e-7 change of H into code flips, so H must not depend on how the samples
  are split into micro-batches and devices: bit for bit the same (core/hessian.py)."""
  xs, masks = _batches(n=1, b=16, t=32)
  x, m = xs[0], masks[0]

  def grouped(size, mesh=None):
    st = hessian.init(48)
    for a in range(0, 16, size):
      st = (hessian.update(st, x[a:a + size], m[a:a + size]) if mesh is None else
            hessian.update_sharded(st, x[a:a + size], m[a:a + size], mesh=mesh))
    return np.asarray(hessian.finalize(st))

  want = grouped(1)
  np.testing.assert_allclose(want, _numpy_h(xs, masks), rtol=2e-5, atol=1e-5)
  for size in (2, 3, 16):
    np.testing.assert_array_equal(grouped(size), want)
  for n in (2, 8):
    mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
    for size in (16, 5):
      np.testing.assert_array_equal(grouped(size, mesh), want)


def test_psum_compensated_adds_exactly_in_any_order():
  """Per-device sums whose plain float32 total depends on the order: the compensated total is the
  exact sum (to about 2^-44) on every device."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  mesh = jax.make_mesh((8,), ("data",))
  rng = np.random.default_rng(3)
  big = rng.choice([1.0, -1.0], (8, 1, 64)) * 2.0 ** rng.integers(0, 20, (8, 1, 64))
  hi = (big + rng.standard_normal((8, 1, 64))).astype(np.float32)
  lo = (rng.standard_normal((8, 1, 64)) * 2.0**-30).astype(np.float32)
  exact = hi.astype(np.float64).sum(0) + lo.astype(np.float64).sum(0)

  def local(h, lo):
    s, e = hessian.psum_compensated(h[0], lo[0], "data")
    return s[None], e[None]

  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
  s, e = (np.asarray(a, np.float64) for a in f(put(hi), put(lo)))
  total = s + e
  assert np.all(total == total[:1])  # the same on every device
  scale = np.abs(hi).max(0).astype(np.float64)
  assert np.max(np.abs(total[0] - exact) / scale) < 2.0**-40
  plain = hi.sum(0, dtype=np.float32)  # what a plain psum can give: off by far more
  assert np.max(np.abs(plain - exact) / scale) > 2.0**-30

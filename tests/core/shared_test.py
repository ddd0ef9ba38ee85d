"""Shared-Hessian solves (q/k/v, gate/up): one factorization and one column loop for several
layers give exactly the codes, grids and g_idx of one quantize_weight per layer."""

import numpy as np
import pytest

import gptq_jax as gj
from gptq_jax.core.shared import quantize_shared
from tests.core.helpers import layer_problem

_, _, H = layer_problem(k_in=160, tokens=512)
H[7, :] = H[:, 7] = 0.0  # a dead input column: handled once for all three
RNG = np.random.default_rng(1)
# q / k / v of different widths (GQA: k, v narrower), heavy-tailed like real weights.
KERNELS = [(RNG.standard_t(4, size=(160, n)) * 0.05).astype(np.float32) for n in (64, 32, 32)]


@pytest.mark.parametrize("kw", [
    dict(bits=4, group_size=64),  # GAR (the default): the permutation depends on H only
    dict(bits=3, group_size=32, desc_act=True, sym=False, format="gptq_v2", static_groups=True,
         block_size=64),
    dict(bits=4, group_size=-1, mse=2.4, mse_weight="hessian"),  # per-row grids and clipping
])
def test_shared_solve_equals_one_solve_per_layer(kw, hessian=H):
  kw = dict(kw)
  cfg = gj.GPTQConfig(kw.pop("bits"), **kw)
  shared = quantize_shared(KERNELS, hessian, cfg, ["q", "k", "v"])
  assert len(shared) == 3
  for kernel, (qw, info) in zip(KERNELS, shared):
    want, want_info = gj.quantize_weight(kernel, hessian, cfg, return_info=True)
    for field in ("codes", "scales", "zeros", "g_idx"):
      np.testing.assert_array_equal(np.asarray(getattr(qw, field)),
                                    np.asarray(getattr(want, field)), err_msg=field)
    assert qw.shape == kernel.shape and (qw.bits, qw.group_size) == (cfg.bits, cfg.group_size)
    assert info.damp == want_info.damp and not info.fallback
    np.testing.assert_allclose(info.loss, want_info.loss, rtol=1e-4)


def test_solve_spread_over_devices_equals_one_solve():
  """The column loop's rows split over the test devices (36 rows: over 6 of the 8, the largest
  divisor) give one device's codes."""
  import jax  # noqa: PLC0415

  from gptq_jax.core.shared import _rows_mesh, solve_mesh  # noqa: PLC0415

  mesh = solve_mesh("on")
  assert mesh is not None and mesh.devices.size == jax.local_device_count() == 8
  assert solve_mesh("auto") is None  # CPU: not spread unless asked
  cfg = gj.GPTQConfig(4, group_size=32, desc_act=True)
  kernels = [KERNELS[2], KERNELS[0][:, :4]]  # 32 + 4 rows
  assert _rows_mesh(mesh, 36).devices.size == 6
  one = quantize_shared(kernels, H, cfg)
  spread = quantize_shared(kernels, H, cfg, mesh=mesh)
  for (qa, ia), (qb, ib) in zip(one, spread):
    for field in ("codes", "zeros", "g_idx"):
      np.testing.assert_array_equal(np.asarray(getattr(qb, field)),
                                    np.asarray(getattr(qa, field)), err_msg=field)
    # a row's grid is computed on its own rows' split: its scale may differ in the last bit
    np.testing.assert_allclose(np.asarray(qb.scales), np.asarray(qa.scales), rtol=2e-7, atol=0)
    assert len(qb.codes.devices()) == 1
    np.testing.assert_allclose(ib.loss, ia.loss, rtol=1e-5)

"""GPTAQ (core/gptaq.py + the GPTAQ path of core/gptq.py) against the NumPy port of the published
update (tests/core/reference_gptaq.py), and its reason to exist: a lower output error against the
float model's inputs than plain GPTQ."""

import numpy as np
import pytest

import gptq_jax as gj
from gptq_jax.core import gptaq, hessian
from tests.core import reference_gptaq as ref
from tests.core.helpers import layer_problem


def _problem(seed=0):
  """Float inputs X_float and the partly quantized model's inputs X = X_float + drift."""
  Xf, kernel, _ = layer_problem(seed=seed, tokens=768, k_in=320, n_out=64)
  rng = np.random.default_rng(seed + 1)
  drift = (0.15 * rng.standard_normal(Xf.shape) * np.abs(Xf).mean(0)).astype(np.float32)
  X = Xf + drift
  X[:, 7] = 0.0  # a dead column: no calibration signal
  Xf[:, 7] = 0.0
  st = hessian.cross_update(hessian.cross_init(X.shape[1]), X, Xf)
  H, dXXT = hessian.finalize_cross(st)
  return X, Xf, kernel, np.asarray(H), np.asarray(dXXT)


X, XF, KERNEL, H, DXXT = _problem()

CONFIGS = [  # bits x group x act-order x GAR x static groups x clipping: a covering subset
    dict(bits=4, group_size=128, desc_act=False, act_group_aware=False, static_groups=False),
    dict(bits=4, group_size=128, desc_act=False, act_group_aware=True, static_groups=False),
    dict(bits=4, group_size=128, desc_act=True, act_group_aware=False, static_groups=False),
    dict(bits=3, group_size=32, desc_act=True, act_group_aware=False, static_groups=True),
    dict(bits=3, group_size=-1, desc_act=False, act_group_aware=False, static_groups=False),
    dict(bits=3, group_size=64, desc_act=False, act_group_aware=True, static_groups=False, mse=2.4),
    dict(bits=2, group_size=128, desc_act=False, act_group_aware=False, static_groups=True),
    dict(bits=8, group_size=32, desc_act=False, act_group_aware=True, static_groups=False),
]


def _cfg(c):
  return gj.GPTQConfig(c["bits"], group_size=c["group_size"], desc_act=c["desc_act"],
                       act_group_aware=c["act_group_aware"], static_groups=c["static_groups"],
                       mse=c.get("mse", 0.0), format="gptq_v2", gptaq=True, gptaq_alpha=0.25)


def test_cross_term_matches_numpy():
  x64, xf64 = X.astype(np.float64), XF.astype(np.float64)
  np.testing.assert_allclose(DXXT, 2.0 / len(X) * (xf64 - x64).T @ x64, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(H, 2.0 / len(X) * x64.T @ x64, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("c", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_port_and_beats_gptq_on_float_targets(c):
  cfg = _cfg(c)
  qw, info = gj.quantize_weight(KERNEL, H, cfg, cross=DXXT, return_info=True)
  gar = c["act_group_aware"] and not c["desc_act"] and c["group_size"] != -1
  codes, scale, zero, g_idx, loss = ref.fasterquant_gptaq(
      KERNEL, H, DXXT, bits=c["bits"], alpha=0.25, group_size=c["group_size"],
      actorder=c["desc_act"], static_groups=c["static_groups"], gar=gar, mse=c.get("mse", 0.0))
  ours, theirs = np.asarray(qw.codes, np.int64), codes.T.astype(np.int64)
  same = np.mean(ours == theirs)
  assert same >= 0.99, f"only {same:.4%} of codes equal the GPTAQ port"
  np.testing.assert_array_equal(np.asarray(qw.g_idx), g_idx)
  assert info.loss == pytest.approx(loss, rel=0.02)
  # GPTAQ's objective: the quantized layer on the drifted inputs against the float layer on the
  # float inputs. Plain GPTQ (same settings, no cross-term) must do worse on it.
  target = XF.astype(np.float64) @ KERNEL

  def float_err(deq):
    d = X.astype(np.float64) @ np.asarray(deq, np.float64) - target
    return float(np.sum(d * d))

  plain = gj.quantize_weight(KERNEL, H, cfg.replace(gptaq=False))
  assert float_err(qw.dequantize()) < float_err(plain.dequantize())


def test_alpha_zero_is_gptq_and_cross_is_required():
  cfg = _cfg(CONFIGS[0])
  a0 = gj.quantize_weight(KERNEL, H, cfg.replace(gptaq_alpha=0.0), cross=DXXT)
  plain = gj.quantize_weight(KERNEL, H, cfg.replace(gptaq=False))
  assert np.mean(np.asarray(a0.codes) == np.asarray(plain.codes)) > 0.999
  with pytest.raises(ValueError, match="cross"):
    gj.quantize_weight(KERNEL, H, cfg)


def test_config_round_trip_and_validation():
  cfg = gj.GPTQConfig(3, gptaq=True, gptaq_alpha=0.5, rotation="hadamard")
  d = cfg.to_dict()
  assert d["meta"]["gptaq"] == {"alpha": 0.5} and d["meta"]["rotation_folded"] == "hadamard"
  assert "rotation" not in d  # GPTQModel's top-level key means an online transform at load
  assert gj.GPTQConfig.from_dict(d) == cfg
  # GPTQModel's own meta (no gptq_jax section) turns GPTAQ on too.
  theirs = {"bits": 4, "group_size": 128, "meta": {"gptaq": {"alpha": 0.25, "device": "auto"}}}
  assert gj.GPTQConfig.from_dict(theirs).gptaq
  with pytest.raises(ValueError, match="gptaq_alpha"):
    gj.GPTQConfig(4, gptaq_alpha=-1)
  with pytest.raises(ValueError, match="gptaq"):
    gj.GPTQConfig(4, gptaq=1)

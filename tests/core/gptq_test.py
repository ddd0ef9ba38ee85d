"""quantize_weight against the NumPy port of the reference (tests/core/reference_gptq.py)."""

import warnings

import jax
import numpy as np
import pytest

import gptq_jax as gj
from gptq_jax.core import gptq as gptq_mod
from tests.core import reference_gptq as ref
from tests.core.helpers import layer_problem, output_error

X, KERNEL, H = layer_problem()

# A covering subset of bits x group x sym x desc_act x GAR x static_groups (every value of every
# field appears, every bits x group pair appears; in=320 leaves a partial last group of 64 at 128).
CONFIGS = [
    dict(bits=b, group_size=g, sym=s, desc_act=d, act_group_aware=a, static_groups=st)
    for (b, g, s, d, a, st) in [
        (4, 128, True, False, True, False),
        (4, 128, False, True, False, False),
        (4, 32, True, True, False, True),
        (4, -1, False, False, False, False),
        (4, -1, True, True, False, False),
        (3, 128, True, False, False, False),
        (3, 32, False, False, True, False),
        (3, -1, True, False, False, False),
        (3, 128, False, True, False, True),
        (2, 128, False, False, True, True),
        (2, 32, True, True, False, False),
        (2, -1, False, True, False, False),
        (8, 128, True, True, False, False),
        (8, 32, False, False, True, True),
        (8, -1, True, False, False, False),
        (4, 32, False, False, False, True),
        (4, 64, True, False, True, False),
    ]
]


def _cfg(c, **extra):
  return gj.GPTQConfig(c["bits"], group_size=c["group_size"], sym=c["sym"],
                       desc_act=c["desc_act"], act_group_aware=c["act_group_aware"],
                       static_groups=c["static_groups"], format="gptq_v2", **extra)


def _oracle(c, kernel=KERNEL, hessian=H, **kw):
  gar = c["act_group_aware"] and not c["desc_act"] and c["group_size"] != -1
  return ref.fasterquant(kernel, hessian, bits=c["bits"], group_size=c["group_size"],
                         sym=c["sym"], actorder=c["desc_act"], static_groups=c["static_groups"],
                         gar=gar, **kw)


@pytest.mark.parametrize("c", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_reference_and_beats_rtn(c):
  cfg = _cfg(c)
  qw, info = gj.quantize_weight(KERNEL, H, cfg, return_info=True)
  codes, scale, zero, g_idx, loss = _oracle(c)
  ours = np.asarray(qw.codes, np.int64)  # [in, out]
  theirs = codes.T.astype(np.int64)
  same = np.mean(ours == theirs)
  assert same >= 0.99, f"only {same:.4%} of codes equal the reference"
  assert np.abs(ours - theirs).max() <= 1
  np.testing.assert_array_equal(np.asarray(qw.g_idx), g_idx)
  err_ours = output_error(X, KERNEL, qw.dequantize())
  err_ref = output_error(X, KERNEL, ref.dequantize(codes, scale, zero, g_idx))
  assert abs(err_ours - err_ref) <= 0.01 * err_ref
  assert info.loss == pytest.approx(loss, rel=0.01)
  assert not info.fallback and info.damp == cfg.damp_percent
  # GPTQ's reason to exist: a clearly lower layer output error than round-to-nearest.
  err_rtn = output_error(X, KERNEL, gj.rtn_quantize(KERNEL, cfg).dequantize())
  assert err_ours < 0.9 * err_rtn, (err_ours, err_rtn)


def test_desc_act_gidx_is_a_nontrivial_grouping():
  c = dict(CONFIGS[1], group_size=32)
  qw = gj.quantize_weight(KERNEL, H, _cfg(c))
  g = np.asarray(qw.g_idx)
  assert np.any(np.diff(g) < 0)  # act-order: non-monotone
  np.testing.assert_array_equal(np.bincount(g), [32] * 10)  # still 10 groups of 32


def test_gar_keeps_trivial_gidx_and_reorders_groups():
  c = CONFIGS[0]
  qw = gj.quantize_weight(KERNEL, H, _cfg(c))
  np.testing.assert_array_equal(np.asarray(qw.g_idx), np.arange(320) // 128)
  perm = np.asarray(gptq_mod.gar_permutation(np.diag(H), 128))
  np.testing.assert_array_equal(perm, ref.gar_perm(np.diag(H), 128))
  assert sorted(perm.tolist()) == list(range(320)) and (perm[256:] == np.arange(256, 320)).all()


def test_block_size_smaller_than_group_uses_block_start_weights():
  # groups span several lazy-update blocks: the carried grid must be the one fitted earlier.
  c = dict(CONFIGS[0], act_group_aware=False)
  qw = gj.quantize_weight(KERNEL, H, _cfg(c, block_size=32))
  codes, *_ = _oracle(c, blocksize=32)
  assert np.mean(np.asarray(qw.codes).astype(int) == codes.T) >= 0.99


def test_mse_clipping_search_matches_reference_grid():
  c = CONFIGS[5]
  cfg = _cfg(c, mse=2.4)
  qw = gj.quantize_weight(KERNEL, H, cfg)
  plain = gj.quantize_weight(KERNEL, H, _cfg(c))
  assert output_error(X, KERNEL, qw.dequantize()) < output_error(X, KERNEL, plain.dequantize())


# Dynamic groups (act-order, asym), static groups (act-order), one group per row (asym).
MSE_CONFIGS = [CONFIGS[i] for i in (1, 2, 3)]


@pytest.mark.parametrize("c", MSE_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_clipping_search_matches_reference_both_weightings(c):
  """``mse=2.4`` with the references' plain search and with ``mse_weight="hessian"`` (each column's
  error over U_jj, including the grids fitted before the loop) equal the NumPy port's codes."""
  codes = {}
  for mw in ("none", "hessian"):
    qw = gj.quantize_weight(KERNEL, H, _cfg(c, mse=2.4, mse_weight=mw))
    codes[mw] = np.asarray(qw.codes).astype(int)
    want, *_ = _oracle(c, mse=2.4, mse_weight=mw)
    assert np.mean(codes[mw] == want.T) >= 0.99, mw
  assert np.mean(codes["none"] != codes["hessian"]) > 0.05  # two really different searches


@pytest.mark.parametrize("seed,i", [(0, 0), (1, 1), (0, 2), (1, 3), (0, 5), (1, 12)])
def test_hessian_weighted_search_lowers_layer_output_error(i, seed):
  """Weighing the search by what the column loop charges beats the plain search on the layer's
  output error ``||X (K - Q)||^2`` (GAR, act-order, static, per-row, 3-bit and 8-bit cases)."""
  X_, kernel, hessian = layer_problem(seed=seed)
  err = {mw: output_error(X_, kernel, gj.quantize_weight(
      kernel, hessian, _cfg(CONFIGS[i], mse=2.4, mse_weight=mw)).dequantize())
         for mw in ("none", "hessian")}
  assert err["hessian"] < 0.98 * err["none"], err


def test_dead_columns_are_zero_and_match_reference():
  Xd = X.copy()
  Xd[:, [3, 77, 200]] = 0.0
  Hd = (2.0 / len(Xd)) * (Xd.T @ Xd)
  for c in (CONFIGS[0], CONFIGS[1], CONFIGS[3]):
    qw = gj.quantize_weight(KERNEL, Hd, _cfg(c))
    deq = np.asarray(qw.dequantize())
    assert np.all(deq[[3, 77, 200]] == 0.0)
    codes, scale, zero, g_idx, _ = _oracle(c, hessian=Hd)
    assert np.mean(np.asarray(qw.codes).astype(int) == codes.T) >= 0.99


def test_rank_deficient_inputs():
  Xr = X[:100]  # 100 tokens, 320 columns
  Hr = (2.0 / 100) * (Xr.T @ Xr)
  cfg = _cfg(CONFIGS[0])
  qw, info = gj.quantize_weight(KERNEL, Hr, cfg, return_info=True)
  deq = np.asarray(qw.dequantize())
  assert np.isfinite(deq).all() and not info.fallback
  assert output_error(Xr, KERNEL, deq) < output_error(Xr, KERNEL, gj.rtn_quantize(KERNEL,
                                                                                  cfg).dequantize())


def test_non_pd_hessian_escalates_damping_with_one_warning():
  v = np.linalg.eigh(H.astype(np.float64))[1][:, 0]  # the smallest eigenvalue's direction
  m = np.mean(np.diag(H))
  # v^T Hbad v = -0.12 mean(diag H): damping 0.1 cannot fix it, a little more can.
  Hbad = (H - (v @ H @ v + 0.12 * m) * np.outer(v, v)).astype(np.float32)
  cfg = gj.GPTQConfig(4, damp_percent=0.1, damp_auto_increment=0.05, format="gptq_v2")
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    qw, info = gj.quantize_weight(KERNEL, Hbad, cfg, return_info=True)
  msgs = [str(w.message) for w in rec if "damp_percent" in str(w.message)]
  assert len(msgs) == 1 and f"{info.damp:.5f}" in msgs[0]
  assert 0.1 < info.damp < 0.5 and not info.fallback
  assert np.isfinite(np.asarray(qw.dequantize())).all()


def test_indefinite_hessian_falls_back_to_rtn_loudly():
  Hneg = -np.eye(320, dtype=np.float32)
  Hneg[0, 0] = 1.0
  cfg = gj.GPTQConfig(4, format="gptq_v2")
  with pytest.warns(UserWarning, match="falls back to round-to-nearest"):
    qw, info = gj.quantize_weight(KERNEL, Hneg, cfg, return_info=True)
  assert info.fallback and np.isnan(info.loss)
  np.testing.assert_array_equal(np.asarray(qw.codes), np.asarray(gj.rtn_quantize(KERNEL,
                                                                                 cfg).codes))


@pytest.mark.parametrize("what", ["kernel", "hessian"])
def test_nonfinite_inputs_are_refused(what):
  k, h = KERNEL.copy(), H.copy()
  (k if what == "kernel" else h)[5, 5] = np.nan
  with pytest.raises(ValueError, match=f"{what} has 1 NaN/Inf"):
    gj.quantize_weight(k, h, gj.GPTQConfig(4))


def test_shape_errors():
  with pytest.raises(ValueError, match=r"hessian must be \[in, in\]"):
    gj.quantize_weight(KERNEL, H[:10, :10], gj.GPTQConfig(4))
  with pytest.raises(ValueError, match="kernel must be 2-D"):
    gj.quantize_weight(KERNEL[None], H, gj.GPTQConfig(4))


def test_v1_asymmetric_zero_points_stay_representable():
  with pytest.warns(UserWarning, match="zero point of 0"):
    cfg = gj.GPTQConfig(4, sym=False)  # format="gptq" (v1)
  shifted = np.abs(KERNEL) + 0.01  # every group non-negative: the reference would pick zero = 0
  qw = gj.quantize_weight(shifted, H, cfg)
  assert int(np.asarray(qw.zeros).min()) >= 1
  packed = qw.pack("gptq")
  np.testing.assert_allclose(packed.dequantize(), qw.dequantize(), rtol=0, atol=0)


def test_result_is_a_jittable_pytree_and_compiles_once():
  cfg = _cfg(CONFIGS[0])
  before = gptq_mod._gptq_blocks._cache_size()
  qw = gj.quantize_weight(KERNEL, H, cfg)
  gj.quantize_weight(KERNEL * 0.5, H * 3.0, cfg)
  assert gptq_mod._gptq_blocks._cache_size() - before <= 1
  leaves, treedef = jax.tree_util.tree_flatten(qw)
  assert len(leaves) == 4
  deq = jax.jit(lambda q: q.dequantize())(qw)
  np.testing.assert_array_equal(deq, qw.dequantize())
  assert qw.dequantize().shape == KERNEL.shape

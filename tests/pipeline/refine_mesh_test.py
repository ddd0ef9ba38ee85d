"""Block refinement on a mesh (data-parallel over the Hessians' data axis), with per-module bit
widths and float modules, and held-out rows that are real samples."""

import jax
import numpy as np
import pytest

import gptq_jax as gj
from gptq_jax.core.weights import PackedWeight
from gptq_jax.pipeline import quantize

# 8-bit q_proj, 2-bit up_proj, o_proj left float; every other linear 4-bit
DYNAMIC = {r"+:.*\.q_proj": {"bits": 8}, r"+:.*\.up_proj": {"bits": 2}, r"-:.*\.o_proj": {}}
BITS = {"q_proj": 8, "up_proj": 2, "k_proj": 4, "v_proj": 4, "gate_proj": 4, "down_proj": 4}
QCFG = gj.GPTQConfig(4, group_size=32, dynamic=DYNAMIC, refine_steps=16, refine_seqlen=0,
                     refine_lr=5e-3)


def _calib32():
  return np.random.default_rng(1).integers(0, 256, (32, 32)).astype(np.int32)


def _run(tiny, devices, qcfg=QCFG, ids=None, params=None, **kw):
  cfg, tiny_params, _ = tiny
  params = tiny_params if params is None else params
  mesh = None if devices == 1 else jax.make_mesh((devices,), ("data",),
                                                 devices=jax.devices()[:devices])
  report = []
  q = quantize(params, _calib32() if ids is None else ids, qcfg, model_config=cfg, mesh=mesh,
               progress=False, report=report, **kw)
  return q, report


@pytest.fixture(scope="module")
def one_device(tiny):
  return _run(tiny, 1)


def _check_widths(tiny, q):
  _, params, _ = tiny
  for i in range(2):
    block = q[f"layers_{i}"]
    o = block["self_attn"]["o_proj"]["kernel"]
    assert not isinstance(o, PackedWeight)  # the float module: untouched, not trained
    np.testing.assert_array_equal(o, params[f"layers_{i}"]["self_attn"]["o_proj"]["kernel"])
    for group in ("self_attn", "mlp"):
      for name, leaf in block[group].items():
        if name == "o_proj":
          continue
        pw = leaf["kernel"]
        assert pw.bits == BITS[name], name
        codes = np.asarray(pw.unpack().codes)
        assert codes.max() <= 2**pw.bits - 1
        # the stored words are exactly the packed codes: nothing spilled into a neighbour
        np.testing.assert_array_equal(pw.unpack().pack(pw.format).qweight, pw.qweight)


@pytest.mark.parametrize("devices", [4, 8])
def test_refinement_on_a_mesh_stays_close_to_one_device(tiny, one_device, devices):
  """Each device trains on its own rows (other minibatches than one device), gradients and
  held-out errors summed over the data axis: the held-out error after refinement is within 5 % of
  the one-device run's, block 0 starts from the same GPTQ error, and every bit width holds."""
  q1, r1 = one_device
  q, r = _run(tiny, devices)
  _check_widths(tiny, q1)
  _check_widths(tiny, q)
  for i in range(2):
    a = next(x for x in r1 if x["block"] == i and "refine_block_mse_after" in x)
    b = next(x for x in r if x["block"] == i and "refine_block_mse_after" in x)
    assert b["refine_kept"] and b["refine_block_mse_after"] < b["refine_block_mse_before"]
    assert b["refine_block_mse_after"] == pytest.approx(a["refine_block_mse_after"], rel=0.05)
    if i == 0:  # the same GPTQ block and the same held-out samples
      assert b["refine_block_mse_before"] == pytest.approx(a["refine_block_mse_before"], rel=1e-5)
  assert not any("refine_kept" in x for x in r if x.get("skipped"))


def _block0_rows(tiny, ids, mask):
  from gptq_jax.models import default_positions, embed

  cfg, params, _ = tiny
  return embed(params, cfg, ids), {"positions": default_positions(mask, *ids.shape),
                                   "attention_mask": mask}, mask


def _refine0(tiny, ids, mask, **kw):
  from gptq_jax.pipeline import LlamaAdapter, rtn_model
  from gptq_jax.pipeline.refine import refine_block

  cfg, params, _ = tiny
  qcfg = gj.GPTQConfig(4, group_size=32, refine_steps=2, **kw)
  q = rtn_model(params, qcfg, model_config=cfg)  # packed kernels, refinement's input
  h, ctx, mask = _block0_rows(tiny, ids, mask)
  return refine_block(LlamaAdapter.for_config(cfg), params["layers_0"], q["layers_0"], h, ctx,
                      mask, qcfg)[1]


def test_held_out_rows_are_real_samples(tiny):
  """10 samples in 12 rows (the last two padding, as a micro-batch's fill): the held-out sample is
  a real one (sample 7), so its error is not 0."""
  ids = np.zeros((12, 32), np.int32)
  ids[:10] = _calib32()[:10]
  mask = np.zeros_like(ids)
  mask[:10] = 1
  info = _refine0(tiny, ids, mask, refine_seqlen=0)
  assert info.mse_before > 0


def test_no_real_training_token_is_an_error(tiny):
  """Left-padded samples whose first refine_seqlen tokens are all padding: a clear error, not a
  refinement that silently trains on nothing."""
  ids = _calib32()[:12]
  mask = np.ones_like(ids)
  mask[:, :8] = 0
  with pytest.raises(ValueError, match="training calibration rows have no real token"):
    _refine0(tiny, ids, mask, refine_seqlen=8)


def test_refined_run_resumed_at_block_1_equals_the_whole_run(tiny, one_device):
  """Resume (blocks before ``start_block`` already done): the stream is carried through the saved
  refined block and block 1 is refined on the same rows as in the whole run."""
  cfg, params, _ = tiny
  whole, _ = one_device
  resumed, _ = _run(tiny, 1, start_block=1, params=params.replace(layers_0=whole["layers_0"]))
  for a, b in zip(jax.tree.leaves(resumed["layers_1"]), jax.tree.leaves(whole["layers_1"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

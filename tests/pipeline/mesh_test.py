"""Every feature on every device count: GPTAQ, rotation, ``dynamic`` (8 and 2 bits, a float
module) and ``lm_head`` together, on 4 and 8 local devices, give the one-device model bit for bit
(the Hessians do not depend on how the samples are spread: core/hessian.py)."""

import jax
import numpy as np
import pytest

import gptq_jax as gj
from gptq_jax.pipeline import quantize
from gptq_jax.pipeline.rotation import rotate_model

DYNAMIC = {r"+:.*\.q_proj": {"bits": 8}, r"+:.*\.up_proj": {"bits": 2}, r"-:.*\.o_proj": {}}
QCFG = gj.GPTQConfig(4, group_size=32, gptaq=True, lm_head=True, dynamic=DYNAMIC,
                     rotation="hadamard")


@pytest.fixture(scope="module")
def rotated(tiny):
  cfg, params, _ = tiny
  return rotate_model(cfg, params, "hadamard")


def _run(rotated, devices):
  cfg, params = rotated
  ids = np.random.default_rng(2).integers(0, 256, (16, 32)).astype(np.int32)
  mesh = None if devices == 1 else jax.make_mesh((devices,), ("data",),
                                                 devices=jax.devices()[:devices])
  return quantize(params, ids, QCFG, model_config=cfg, mesh=mesh, progress=False,
                  batch_size=1 if devices == 1 else None)


@pytest.fixture(scope="module")
def one_device(rotated):
  return _run(rotated, 1)


@pytest.mark.parametrize("devices", [4, 8])
def test_gptaq_rotation_dynamic_lm_head_equal_one_device(rotated, one_device, devices):
  many = _run(rotated, devices)
  want = jax.tree_util.tree_leaves_with_path(one_device)
  got = dict(jax.tree_util.tree_leaves_with_path(many))
  assert len(got) == len(want)
  for path, leaf in want:
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(leaf),
                                  err_msg=jax.tree_util.keystr(path))
  head = one_device["lm_head"]["kernel"]
  assert isinstance(head, gj.PackedWeight) and head.bits == 4
  assert one_device["layers_0"]["self_attn"]["q_proj"]["kernel"].bits == 8
  assert one_device["layers_1"]["mlp"]["up_proj"]["kernel"].bits == 2
  assert not isinstance(one_device["layers_0"]["self_attn"]["o_proj"]["kernel"], gj.PackedWeight)

"""The Hessians the pipeline accumulates do not depend on how the calibration samples are spread
over micro-batches and devices: bit for bit (GPTQ's column loop turns a 1e-7 change of H into
code flips that grow block after block; core/hessian.py)."""

import jax
import numpy as np

from gptq_jax.pipeline import calib
from gptq_jax.pipeline.adapter import ModelAdapter
from gptq_jax.pipeline.capture import capture_for
from gptq_jax.pipeline.driver import _Stream, resolve_mesh
from gptq_jax.pipeline.dynamic import lm_head_hessian
from gptq_jax.pipeline.gptaq import cross_capture_for

QKV = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"))
DOWN = (("mlp", "down_proj"),)


def _stats(tiny, batch_size, devices):
  cfg, params, batches = tiny
  mesh = None if devices == 1 else resolve_mesh(
      jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices]), "data")
  samples, _ = calib.normalize(batches)
  mb = calib.micro_batches(samples, max(batch_size, devices), multiple=devices)
  adapter = ModelAdapter.for_config(cfg)
  blk = adapter.block_adapter(0)
  stream = _Stream(adapter, params, mb, mesh, "data")
  out = {}
  for group in (QKV, DOWN):
    cap = capture_for(blk, group, mesh, "data")
    cap.reset()
    cross = cross_capture_for(blk, group, mesh, "data")
    cross.reset()
    for h, ctx, mask in zip(stream.hidden, stream.ctx, stream.masks):
      cap.add(params["layers_0"], h, ctx, mask)
      cross.add(params["layers_0"], h, ctx, mask, float_params=params["layers_1"],
                float_hidden=h)
    out[group] = [np.asarray(cap.hessian(group[0])), np.asarray(cross.hessian(group[0])),
                  np.asarray(cross.cross(group[0]))]
  out["lm_head"] = [np.asarray(lm_head_hessian(cfg, params, stream.hidden, stream.masks, mesh))]
  return out


def test_hessians_are_the_same_however_the_samples_are_spread(tiny):
  want = _stats(tiny, 1, 1)  # one sample per micro-batch, one device
  for batch_size, devices in ((8, 1), (3, 2), (8, 8)):
    got = _stats(tiny, batch_size, devices)
    for key, arrays in want.items():
      for a, b in zip(arrays, got[key]):
        np.testing.assert_array_equal(b, a, err_msg=f"{key} {batch_size=} {devices=}")
  assert np.abs(want[DOWN][2]).max() > 0  # the cross-term saw two different streams

"""Whole-model round-to-nearest: every block linear equals ``rtn_quantize`` of its own weights."""

import numpy as np

import gptq_jax as gj
from gptq_jax.pipeline import LLAMA_GROUPS, dense_block, rtn_model
from gptq_jax.pipeline.adapter import get_path


def test_rtn_model_quantizes_every_linear_like_rtn_quantize(tiny):
  cfg, params, _ = tiny
  qcfg = gj.GPTQConfig(3, group_size=32, sym=False, format="gptq_v2")
  qparams = rtn_model(params, qcfg, model_config=cfg)
  dense = dense_block(qparams)
  for i in range(cfg.num_hidden_layers):
    for path in sum(LLAMA_GROUPS, ()):
      packed = get_path(qparams[f"layers_{i}"], path)["kernel"]
      kernel = np.asarray(get_path(params[f"layers_{i}"], path)["kernel"])
      assert isinstance(packed, gj.PackedWeight) and packed.format == "gptq_v2"
      expected = np.asarray(gj.rtn_quantize(kernel, qcfg).dequantize())
      np.testing.assert_array_equal(np.asarray(packed.dequantize()), expected)
      got = np.asarray(get_path(dense[f"layers_{i}"], path)["kernel"])
      np.testing.assert_array_equal(got, expected)
      assert 0 < np.abs(got - kernel).max() <= np.abs(kernel).max() / 3  # quantized, not garbage
  np.testing.assert_array_equal(qparams["embed_tokens"]["embedding"],
                                params["embed_tokens"]["embedding"])

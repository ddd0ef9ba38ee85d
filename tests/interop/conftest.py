"""A tiny random Llama (the transformers oracle's weights) and its GPTQ results, cached per config."""

import numpy as np
import pytest

import gptq_jax as gj
from gptq_jax.models.testing import tiny_pair


@pytest.fixture(scope="session")
def tiny_llama():
  """(our LlamaConfig, float params, calibration ids [8, 32]) of a tiny random Llama."""
  _, cfg, params = tiny_pair(0)
  ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (8, 32)).astype(np.int32)
  return cfg, params, ids


@pytest.fixture(scope="session")
def quantized(tiny_llama):
  """quantized(bits, desc_act) -> (GPTQConfig, qparams): group 32, sym, v1, computed once each."""
  cfg, params, ids = tiny_llama
  cache = {}

  def get(bits: int, desc_act: bool):
    if (bits, desc_act) not in cache:
      qcfg = gj.GPTQConfig(bits, group_size=32, desc_act=desc_act, act_group_aware=False)
      cache[bits, desc_act] = qcfg, gj.quantize(params, ids, qcfg, model_config=cfg, mesh=None,
                                             progress=False)
    return cache[bits, desc_act]

  return get

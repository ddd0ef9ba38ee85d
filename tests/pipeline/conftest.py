"""Tiny Llama fixtures for the pipeline tests."""

import numpy as np
import pytest

from gptq_jax.models import LlamaConfig, init_params


@pytest.fixture(scope="session")
def tiny():
  # Every linear is 64 x 64: one compiled solver per config serves the whole model.
  cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                    tie_word_embeddings=False)
  params = init_params(cfg, 0)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 256, (8, 32)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[5, 20:] = 0  # a padded sample: its padding must not reach any Hessian
  mask[6, 11:] = 0
  return cfg, params, [{"input_ids": ids[:4], "attention_mask": mask[:4]},
                       {"input_ids": ids[4:], "attention_mask": mask[4:]}]

"""The tiny Llama and calibration data both sides of the multi-host test use."""

import numpy as np

import gptq_jax as gj
from gptq_jax.models import LlamaConfig, init_params


def tiny_setup(moe: bool = False):
  """(config, params, calibration ids [16, 32] with two padded rows, GPTQConfig); ``moe``: a
  Qwen3-MoE (8 experts, top 2; block 1 dense-only) instead of the Llama."""
  cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    tie_word_embeddings=False)
  if moe:
    cfg = cfg.replace(model_type="qwen3_moe", qk_norm=True, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=(1,))
  params = init_params(cfg, 0)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 256, (16, 32)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[3, 20:] = 0
  mask[12, 9:] = 0
  samples = [{"input_ids": ids[r:r + 1], "attention_mask": mask[r:r + 1]} for r in range(16)]
  return cfg, params, samples, gj.GPTQConfig(4, group_size=32, act_group_aware=False)

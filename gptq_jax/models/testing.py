"""Test helpers (need torch + transformers): tiny random transformers Llamas as the oracle, and the
same weights as our params. Used by this project's tests; handy for any model-level test."""

from __future__ import annotations

from typing import Any

import numpy as np

from gptq_jax.models.config import ModelConfig
from gptq_jax.models.hf import Params, from_hf_state_dict

TINY_HF_CONFIG = dict(
    vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
    rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    # head_dim 16: wavelengths 6..6283 straddle 32/4 and 32/1, so all three llama3 bands are used.
    rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
)


def tiny_hf_model(seed: int = 0, **overrides: Any):
  """A transformers LlamaForCausalLM (torch, fp32, eval) with every weight randomized.

  Norm weights near 1, embeddings N(0, 1), projections N(0, 0.12^2): logits of order 10, so
  disagreements show. `overrides` change `TINY_HF_CONFIG` entries.
  """
  import torch  # noqa: PLC0415 (optional dependency)
  import transformers  # noqa: PLC0415

  torch.manual_seed(seed)
  config = transformers.LlamaConfig(**dict(TINY_HF_CONFIG, **overrides))
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith("embed_tokens.weight"):
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(0.12 * torch.randn_like(p))
  return model


def tiny_pair(seed: int = 0, **overrides: Any) -> tuple[Any, ModelConfig, Params]:
  """(transformers model, our config, our params) holding the same random tiny Llama."""
  hf = tiny_hf_model(seed, **overrides)
  cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
  return hf, cfg, from_hf_state_dict(cfg, hf.state_dict())


def torch_logits(hf_model: Any, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
  """transformers' logits `[batch, seq, vocab]` as float32 numpy."""
  import torch  # noqa: PLC0415

  with torch.no_grad():
    mask = None if attention_mask is None else torch.tensor(np.asarray(attention_mask))
    out = hf_model(torch.tensor(np.asarray(ids, np.int64)), attention_mask=mask)
    return out.logits.float().numpy()

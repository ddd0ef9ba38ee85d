"""Tiny random float Hugging Face folders of every family, built offline from transformers' own
config classes (torch + transformers only, so either venv can import it).

Every dimension GPTQ touches is a multiple of 32 (group size 32, and GPTQModel's torch kernel
packs output columns by 8), the sliding window (8) is shorter than the test sequences (32), and
between them the families cover GQA, tied and untied embeddings, q/k/v biases, per-head q/k norms,
a head_dim that is not hidden / heads, and Gemma 3's sliding/global layer mix.
"""

from __future__ import annotations

import os
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")

_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               bos_token_id=1, eos_token_id=2)

# family -> (transformers config class, model class, config fields beyond _COMMON)
CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(rms_norm_eps=1e-5, sliding_window=8, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=True,
                   sliding_window=8, max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(rms_norm_eps=1e-6, head_dim=32, tie_word_embeddings=True)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(rms_norm_eps=1e-6, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
                         layer_types=["sliding_attention", "full_attention"], pad_token_id=0,
                         rope_parameters={
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                "rope_theta": 1000000.0}},
                         tie_word_embeddings=True)),
}


def tiny_family_model(family: str, seed: int = 0):
  """A transformers *ForCausalLM of `family` (torch, float32, eval) with every weight randomized:
  norm weights near 1 (near 0 for Gemma's (1 + w) norms), embeddings N(0, 1), projections and
  biases N(0, 0.12^2), so logits are of order 10 and disagreements show."""
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  config_cls, model_cls, extra = CONFIGS[family]
  torch.manual_seed(seed)
  config = getattr(transformers, config_cls)(**_COMMON, **extra)
  model = getattr(transformers, model_cls)(config).eval()
  gemma = family.startswith("gemma")
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_((0.0 if gemma else 1.0) + 0.2 * torch.randn_like(p))
      elif name.endswith("embed_tokens.weight"):
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(0.12 * torch.randn_like(p))
  return model


def save_family_folder(folder: str, model, tokenizer=None) -> str:
  """Writes `model` as a float32 safetensors folder (plus `tokenizer`, which GPTQModel needs)."""
  model.save_pretrained(folder, safe_serialization=True)
  if tokenizer is not None:
    tokenizer.save_pretrained(folder)
  return os.path.abspath(folder)

"""Test helpers (need torch + transformers): tiny random transformers models of every family as the
oracle, and the same weights as our params. Used by this project's tests; handy for any model-level
test (`tiny_pair("qwen3")`).

Each family's tiny config exercises what sets it apart: GQA everywhere; Llama's llama3 RoPE
scaling; Mistral's sliding window (shorter than the test sequences); Qwen2's q/k/v biases, tied
embeddings and a sliding last layer; Qwen3's q/k norms and a head_dim that is not hidden / heads;
Gemma 3's sliding and full layers with their two RoPE bases (linear scaling on the full ones), its
(1 + w) norms, four norms per block, GELU-tanh MLP, scaled embeddings and query_pre_attn_scalar;
Qwen3-MoE's renormalized top-k and a dense-only layer (`mlp_only_layers`); Qwen2-MoE's gated
shared expert and a sliding first layer; Mixtral's sliding window on every layer.
Gemma 4 (`gemma4_text`, 4 layers): per-layer inputs, full layers with their own head size (32 vs
16), one key/value head and k_eq_v, proportional RoPE, the last two layers sharing the first two's
keys / values with double-wide MLPs, a window of 8, a final soft cap, random `layer_scalar`s and
an untied lm_head (tied, the random model's greedy continuation repeats the last token).
`GEMMA4_PLAIN` turns sharing, k_eq_v and the double-wide MLP off and ties the embeddings
(`tiny_pair("gemma4_text", **GEMMA4_PLAIN)`); `GEMMA4_MOE` makes every layer a mixture of experts
beside its dense MLP.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gptq_jax.models.config import ModelConfig
from gptq_jax.models.hf import from_hf_state_dict
from gptq_jax.models.params import ModelParams

_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

TINY_HF_CONFIG = dict(
    _COMMON, rope_theta=10000.0, tie_word_embeddings=False,
    # head_dim 16: wavelengths 6..6283 straddle 32/4 and 32/1, so all three llama3 bands are used.
    rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
)

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": TINY_HF_CONFIG,
    "mistral": dict(_COMMON, rope_theta=10000.0, sliding_window=16, tie_word_embeddings=False),
    "qwen2": dict(_COMMON, rope_theta=10000.0, tie_word_embeddings=True, use_sliding_window=True,
                  sliding_window=16, max_window_layers=1),
    "qwen3": dict(_COMMON, head_dim=32, rope_theta=10000.0, tie_word_embeddings=False,
                  attention_bias=False),
    "gemma3_text": dict(
        _COMMON, num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=24, sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        tie_word_embeddings=True, pad_token_id=0, hidden_activation="gelu_pytorch_tanh"),
    "gemma4_text": dict(
        _COMMON, num_hidden_layers=4, intermediate_size=96, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=256, num_kv_shared_layers=2,
        use_double_wide_mlp=True, final_logit_softcapping=60.0, tie_word_embeddings=False,
        pad_token_id=0, hidden_activation="gelu_pytorch_tanh"),
    # Mixtures of experts (models/moe.py): 8 / 8 / 4 experts, 2 per token.
    "qwen3_moe": dict(_COMMON, head_dim=32, rope_theta=10000.0, tie_word_embeddings=False,
                      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True, mlp_only_layers=[1], intermediate_size=96),
    "qwen2_moe": dict(_COMMON, rope_theta=10000.0, tie_word_embeddings=False, num_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, norm_topk_prob=False,
                      use_sliding_window=True, sliding_window=16, max_window_layers=1),
    "mixtral": dict(_COMMON, rope_theta=10000.0, tie_word_embeddings=False, num_local_experts=4,
                    num_experts_per_tok=2, intermediate_size=64, sliding_window=16),
}
GEMMA4_PLAIN = dict(num_kv_shared_layers=0, attention_k_eq_v=False, use_double_wide_mlp=False,
                    tie_word_embeddings=True)
# For quantization tests: three layers (sliding; full with k_eq_v, the K/V producer; full, sharing
# them), every linear 64 x 64 (one compiled GPTQ solver per set of layers solved together).
GEMMA4_UNIFORM = dict(num_hidden_layers=3, layer_types=["sliding_attention", "full_attention",
                                                         "full_attention"],
                      num_kv_shared_layers=1, intermediate_size=64, num_key_value_heads=4,
                      global_head_dim=16, num_global_key_value_heads=4, use_double_wide_mlp=False,
                      hidden_size_per_layer_input=64)
# Gemma 4's mixture of experts (every layer sparse, the dense MLP beside): 4 experts, 2 per token.
GEMMA4_MOE = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32)
MOE_FAMILY_NAMES = ("qwen3_moe", "qwen2_moe", "mixtral")
# The dense families of the shared parametrized tests (Gemma 4 has its own:
# tests/models/gemma4_test.py).
FAMILY_NAMES = tuple(f for f in TINY_CONFIGS if f not in MOE_FAMILY_NAMES + ("gemma4_text",))
_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
            "mistral": ("MistralConfig", "MistralForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
            "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
            "gemma4_text": ("Gemma4TextConfig", "Gemma4ForCausalLM"),
            "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
            "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
            "mixtral": ("MixtralConfig", "MixtralForCausalLM")}


def _family(family: str) -> str:
  aliases = {"gemma3": "gemma3_text", "gemma": "gemma3_text", "gemma4": "gemma4_text",
             "qwen2.5": "qwen2"}
  family = aliases.get(family, family)
  if family not in TINY_CONFIGS:
    raise ValueError(f"unknown family {family!r}: one of {tuple(TINY_CONFIGS)}")
  return family


def tiny_hf_config(family: str = "llama", **overrides: Any):
  """The transformers config object of a tiny model of `family` (`overrides` change entries)."""
  import transformers  # noqa: PLC0415 (optional dependency)

  family = _family(family)
  config = getattr(transformers, _CLASSES[family][0])(**dict(TINY_CONFIGS[family], **overrides))
  config._attn_implementation = "eager"  # the plain reference path (masks as documented)
  return config


def tiny_hf_model(seed: int = 0, family: str = "llama", **overrides: Any):
  """A transformers CausalLM of `family` (torch, fp32, eval) with every weight randomized.

  Norm scales near 1 (Gemma 3's (1 + w) norms: w near 0), embeddings N(0, 1), projections and
  biases N(0, 0.12^2): logits of order 10, so disagreements show. Gemma 4's `layer_scalar`
  buffers are drawn in [0.5, 1.5], its router's `scale` and `per_expert_scale` near 1.
  """
  import torch  # noqa: PLC0415 (optional dependency)
  import transformers  # noqa: PLC0415

  if isinstance(seed, str):  # tiny_hf_model("qwen3", ...)
    seed, family = 0, seed
  family = _family(family)
  torch.manual_seed(seed)
  config = tiny_hf_config(family, **overrides)
  model = getattr(transformers, _CLASSES[family][1])(config).eval()
  offset = family == "gemma3_text"
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(("norm.weight", "router.scale", "per_expert_scale")):
        p.copy_((0.0 if offset else 1.0) + 0.2 * torch.randn_like(p))
      elif name.endswith("embed_tokens.weight"):
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(0.12 * torch.randn_like(p))
    for name, b in model.named_buffers():
      if name.endswith("layer_scalar"):
        b.copy_(0.5 + torch.rand_like(b))
  return model


def tiny_pair(family: str | int = "llama", seed: int = 0, **overrides: Any
              ) -> tuple[Any, ModelConfig, ModelParams]:
  """(transformers model, our config, our params) holding the same random tiny model of `family`
  (one of "llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma4_text"). `tiny_pair(seed)`
  (an int first) is the Llama, as before families existed."""
  if not isinstance(family, str):
    family, seed = "llama", family
  hf = tiny_hf_model(seed, family, **overrides)
  cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
  return hf, cfg, from_hf_state_dict(cfg, hf.state_dict())


def torch_logits(hf_model: Any, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
  """transformers' logits `[batch, seq, vocab]` as float32 numpy."""
  import torch  # noqa: PLC0415

  with torch.no_grad():
    mask = None if attention_mask is None else torch.tensor(np.asarray(attention_mask))
    out = hf_model(torch.tensor(np.asarray(ids, np.int64)), attention_mask=mask)
    return out.logits.float().numpy()


def random_ids(batch: int, seq: int, seed: int = 0) -> np.ndarray:
  """Token ids `[batch, seq]` in [3, 256) (the tiny models' vocabulary, past bos / eos)."""
  return np.random.RandomState(seed).randint(3, 256, size=(batch, seq)).astype(np.int32)


def assert_close(ours: Any, ref: np.ndarray, rel: float = 2e-6) -> None:
  """max |ours - ref| below `rel` times max |ref|."""
  scale = float(np.abs(ref).max())
  err = float(np.abs(np.asarray(ours) - ref).max())
  assert err < rel * scale, f"max error {err} vs scale {scale}"

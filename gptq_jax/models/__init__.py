"""The Flax decoder of every supported family (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 3 text):
config, modules, pure block-at-a-time helpers, and loading / saving."""

from gptq_jax.models.attention import KVCache, init_kv_cache
from gptq_jax.models.config import LlamaConfig, ModelConfig, RopeScaling
from gptq_jax.models.families import FAMILIES, SEQUENTIAL_GROUPS
from gptq_jax.models.params import ModelParams, as_model_params
from gptq_jax.models.embedded import smollm2_gguf_path
from gptq_jax.models.gguf import GGUFCheckpoint, load_gguf, read_gguf
from gptq_jax.models.hf import (HFCheckpoint, from_hf_state_dict, load_hf_config, load_hf_folder,
                                      load_layer_params, load_nonlayer_params, save_hf_folder,
                                      to_hf_state_dict)
from gptq_jax.models.layers import Embed, Linear, RMSNorm, linear_apply
from gptq_jax.models.loading import load_llama, load_model, load_tokenizer, resolve_model_spec
from gptq_jax.models.model import (MLP, CausalLM, DecoderLayer, LlamaDecoderLayer, LlamaForCausalLM,
                                   LlamaMLP, Params,
                                         block_forward, default_positions, embed, final_logits,
                                         forward, forward_with_cache, init_params, layer_params)

__all__ = [
    "KVCache", "init_kv_cache", "FAMILIES", "SEQUENTIAL_GROUPS", "ModelParams", "as_model_params",
    "ModelConfig", "LlamaConfig", "RopeScaling", "GGUFCheckpoint", "load_gguf", "read_gguf",
    "smollm2_gguf_path", "HFCheckpoint", "from_hf_state_dict", "load_hf_config", "load_hf_folder", "load_layer_params",
    "load_nonlayer_params", "save_hf_folder", "to_hf_state_dict", "Embed", "Linear", "RMSNorm",
    "linear_apply", "load_model", "load_llama", "load_tokenizer", "resolve_model_spec", "DecoderLayer", "CausalLM", "MLP", "LlamaDecoderLayer",
    "LlamaForCausalLM", "LlamaMLP", "Params", "block_forward", "default_positions", "embed",
    "final_logits", "forward", "forward_with_cache", "init_params", "layer_params",
]

"""gptq_jax: GPTQ post-training quantization of LLaMA-family models in JAX."""

from gptq_jax.config import GPTQConfig
from gptq_jax.core.gptq import GPTQInfo, quantize_weight, rtn_quantize
from gptq_jax.core.weights import PackedWeight, QuantizedWeight

__all__ = [
    "GPTQConfig",
    "GPTQInfo",
    "PackedWeight",
    "QuantizedWeight",
    "quantize_weight",
    "rtn_quantize",
]

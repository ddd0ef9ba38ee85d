"""gptq_jax: GPTQ post-training quantization of decoder LLMs (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 3) in JAX."""

from gptq_jax.config import GPTQConfig
from gptq_jax.core.gptq import GPTQInfo, quantize_weight, rtn_quantize
from gptq_jax.core.weights import PackedWeight, QuantizedWeight
from gptq_jax.kernels.quantized_matmul import quantized_matmul
from gptq_jax.pipeline.driver import quantize

__all__ = [
    "GPTQConfig",
    "GPTQInfo",
    "PackedWeight",
    "QuantizedWeight",
    "quantize",
    "quantize_weight",
    "quantized_matmul",
    "rtn_quantize",
]

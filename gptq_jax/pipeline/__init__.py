"""The block-sequential GPTQ driver and the model adapter it talks to."""

from gptq_jax.pipeline.adapter import LLAMA_GROUPS, DecoderAdapter, LlamaAdapter, ModelAdapter
from gptq_jax.pipeline.driver import dense_block, quantize
from gptq_jax.pipeline.rtn import rtn_model

__all__ = ["LLAMA_GROUPS", "DecoderAdapter", "LlamaAdapter", "ModelAdapter", "dense_block", "quantize", "rtn_model"]

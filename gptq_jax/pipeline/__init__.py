"""The block-sequential GPTQ driver and the model adapter it talks to."""

from gptq_jax.pipeline.adapter import LLAMA_GROUPS, DecoderAdapter, LlamaAdapter
from gptq_jax.pipeline.driver import dense_block, quantize

__all__ = ["LLAMA_GROUPS", "DecoderAdapter", "LlamaAdapter", "dense_block", "quantize"]

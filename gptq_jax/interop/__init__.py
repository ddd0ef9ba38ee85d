"""Hugging Face GPTQ folders in and out, and quantizing a folder larger than RAM block by block."""

from gptq_jax.interop.hf_gptq import (FolderWriter, block_tensors, export_hf, import_hf,
                                      nonlayer_tensors, quantization_config, read_block,
                                      read_quantization_config)
from gptq_jax.interop.streaming import StreamingLlamaAdapter, StreamingModelAdapter, quantize_folder

__all__ = ["FolderWriter", "block_tensors", "export_hf", "import_hf", "nonlayer_tensors",
           "quantization_config", "quantize_folder", "read_block", "read_quantization_config",
           "StreamingLlamaAdapter", "StreamingModelAdapter"]

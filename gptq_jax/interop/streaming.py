"""Quantize a Hugging Face folder larger than RAM: blocks read on demand, written as they finish.

``quantize_folder(src, calib_batches, cfg, out)`` runs the usual block-sequential driver
(``gptq_jax.quantize``) with a ``StreamingModelAdapter``: the driver's params hold only the token
embedding (what the first block's input needs); each decoder block is read from the memory-mapped
safetensors when the driver asks for it (``get_block``) and, once quantized, handed to a sink
(``set_block``) that writes it as one shard of the output GPTQ folder and drops it. Peak host memory
is about one float block, its quantized copy, the embedding and the calibration activations — not
the model. The folder is written atomically (``FolderWriter``) and loads with ``import_hf``.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp

from gptq_jax.config import GPTQConfig
from gptq_jax.interop.hf_gptq import FolderWriter, block_tensors, nonlayer_tensors
from gptq_jax.models.hf import (HFCheckpoint, Params, embedding_keys, nonlayer_tensor_specs,
                                params_from_tensors)
from gptq_jax.pipeline.adapter import ModelAdapter
from gptq_jax.pipeline.driver import quantize

BlockSink = Callable[[int, Params], None]


class StreamingModelAdapter(ModelAdapter):
  """The built-in decoder with its blocks on disk: ``get_block`` reads block ``i`` from ``ckpt``
  (only its tensors; the memory maps are closed again so no page stays resident), ``set_block``
  passes the quantized block to ``sink(i, block)`` and keeps nothing."""

  def __init__(self, ckpt: HFCheckpoint, sink: BlockSink, dtype: Any = jnp.float32):
    super().__init__(ckpt.config)
    self.ckpt, self.sink, self.dtype = ckpt, sink, dtype

  def get_block(self, params, i):
    try:
      return self.ckpt.layer_params(i, self.dtype)
    finally:
      self.ckpt.close()

  def set_block(self, params, i, block_params):
    self.sink(i, block_params)
    return params


def _embedding(ckpt: HFCheckpoint, dtype: Any) -> Params:
  keys = embedding_keys(ckpt.config)  # the token embedding (and Gemma 4's per-layer inputs)
  specs = [s for s in nonlayer_tensor_specs(ckpt.config) if s[0][0] in keys]
  try:
    return params_from_tensors(specs, ckpt.get, dtype)
  finally:
    ckpt.close()


def quantize_folder(src: str | os.PathLike, calib_batches: Any, cfg: GPTQConfig,
                    out: str | os.PathLike, *, tokenizer: Any = None, dtype: Any = "float16",
                    compute_dtype: Any = jnp.float32, **quantize_kwargs) -> str | None:
  """GPTQ-quantizes the float HF folder ``src`` block by block into the GPTQ folder ``out``.

  Args:
    src: a Hugging Face folder of any supported family (safetensors, one file or shards).
    calib_batches, cfg: as for ``gptq_jax.quantize``.
    out: the new GPTQ folder (refused if it exists); written by process 0 only under
      ``jax.distributed`` (every process computes the same blocks).
    tokenizer: saved into ``out`` when given.
    dtype: dtype of the float tensors written (embeddings, norms, lm_head).
    compute_dtype: dtype the blocks are read in for quantization.
    quantize_kwargs: passed to ``gptq_jax.quantize`` (mesh, batch_size, progress, report, ...).

  Returns:
    ``out`` (None on processes other than 0).
  """
  if cfg.lm_head:
    raise ValueError("GPTQConfig.lm_head=True is not supported by quantize_folder (block by block "
                     "from disk): quantize in memory with gptq_jax.quantize, or leave lm_head off")
  ckpt = HFCheckpoint(src)
  model_config = ckpt.config
  writer = None
  if jax.process_index() == 0:
    writer = FolderWriter(out, model_config, cfg, dtype=dtype, tokenizer=tokenizer)
  sink = (lambda i, block: writer.add(block_tensors(model_config, i, block, cfg, dtype))) if (
      writer is not None) else (lambda i, block: None)
  try:
    adapter = StreamingModelAdapter(ckpt, sink, compute_dtype)
    quantize(_embedding(ckpt, compute_dtype), calib_batches, cfg, adapter=adapter,
             **quantize_kwargs)
    if writer is None:
      return None
    try:
      writer.add(nonlayer_tensors(model_config, ckpt.nonlayer_params(compute_dtype), dtype))
    finally:
      ckpt.close()
    return writer.finish()
  except BaseException:
    if writer is not None:
      shutil.rmtree(writer.tmp, ignore_errors=True)
    raise
  finally:
    ckpt.close()


StreamingLlamaAdapter = StreamingModelAdapter  # the pre-families name

"""The streamed CLI's outputs, written a part at a time (docs/scale.md).

The quantized blocks are already on disk when the block loop ends: the resume state saved each
one under ``<output>.partial/blocks`` as soon as it was done. The orbax checkpoint links those
steps in as its parts (``checkpoint_parts.py``) and adds the float embedding and lm_head read
once more from the model files, one tensor at a time; the Hugging Face folder (``--save-hf``) is
written one shard per block, each block read back from the checkpoint. The whole model is never
in host memory: only the largest single part (and orbax's buffers for it).
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax


def _by_size(source) -> list[str]:
  """The top-level keys of the model's non-block tensors, largest first."""
  from gptq_jax.models import hf as hf_lib  # noqa: PLC0415

  size: dict[str, int] = {}
  for path, _, shape in hf_lib.nonlayer_tensor_specs(source.config):
    size[path[0]] = size.get(path[0], 0) + math.prod(shape)
  return sorted(size, key=lambda k: -size[k])


def save_checkpoint(path: str, *, source, dtype: str, blocks_dir: str, qhead: dict,
                    model_config, quant_config, tokenizer, records: list,
                    extra: dict | None = None) -> None:
  """Write the orbax checkpoint of a streamed run at ``path`` (every process calls it)."""
  from gptq_jax.checkpoint_parts import PartsWriter  # noqa: PLC0415

  writer = PartsWriter(path)
  keys = [k for k in _by_size(source) if k not in qhead]
  rest = dict(qhead)
  *large, smallest = keys  # the final norm stays in the top step (orbax needs a non-empty item)
  for key in large:
    writer.add(key, source.nonlayer_host(dtype, only=(key,))[key])  # one tensor in memory
  rest.update(source.nonlayer_host(dtype, only=(smallest,)))
  writer.link_blocks(blocks_dir, {f"layers_{i}": i
                                  for i in range(model_config.num_hidden_layers)})
  meta = {"model_config": model_config.to_hf_dict(),  # as checkpoint.save writes it
          "compute_dtype": getattr(model_config, "dtype", "float32"),
          "quant_config": quant_config.to_dict(), "records": records, **(extra or {})}
  writer.finish(rest, meta, tokenizer)


def export_hf(folder: str, checkpoint_path: str, *, model_config, quant_config, tokenizer,
              calibration_source, write: bool = True, hf_format: str = "gptq") -> None:
  """``--save-hf``: the HF folder (``hf_format``: gptq or compressed-tensors) from the finished
  checkpoint, one shard per part. Under ``jax.distributed`` every process calls it (orbax's reads
  meet at barriers) and the one with ``write`` writes the folder."""
  from gptq_jax.checkpoint import read_tree  # noqa: PLC0415
  from gptq_jax.checkpoint_parts import PARTS  # noqa: PLC0415
  from gptq_jax.interop import formats  # noqa: PLC0415
  from gptq_jax.interop.hf_gptq import block_tensors, nonlayer_tensors  # noqa: PLC0415

  rest, meta = read_tree(os.path.join(checkpoint_path, "orbax"))
  parts = meta[PARTS]
  nonlayer = dict(rest)
  for key, (sub, step, _) in parts.items():
    if sub == "nonlayer":
      nonlayer[key] = read_tree(os.path.join(checkpoint_path, sub), step)[0][key]
  linear = formats.get(hf_format).linear
  writer = formats.writer(folder, model_config, quant_config, hf_format=hf_format,
                          tokenizer=tokenizer, calibration_source=calibration_source
                          ) if write else None
  if writer is not None:
    writer.add(nonlayer_tensors(model_config, nonlayer, cfg=quant_config, linear=linear))
  del nonlayer
  for i in range(model_config.num_hidden_layers):
    sub, step, _ = parts[f"layers_{i}"]
    block, _ = read_tree(os.path.join(checkpoint_path, sub), step)
    if writer is not None:
      writer.add(block_tensors(model_config, i, block, quant_config, linear=linear))
  if writer is not None:
    writer.finish()


def load_for_sample(checkpoint_path: str):
  """The finished checkpoint's params on the device (for the sample generation after; every
  process calls it under ``jax.distributed``: orbax's reads meet at barriers)."""
  from gptq_jax import checkpoint  # noqa: PLC0415

  return jax.device_put(checkpoint.read(checkpoint_path).params)

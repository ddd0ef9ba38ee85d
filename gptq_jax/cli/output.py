"""The streamed CLI's outputs, written a part at a time (docs/scale.md).

The quantized blocks are already on disk when the block loop ends: the resume state saved each
one under ``<output>.partial/blocks`` as soon as it was done. The orbax checkpoint links those
steps in as its parts (``checkpoint_parts.py``) and adds the float embedding and lm_head read
once more from the model files (rotated on read with ``--rotation``), a slice of the vocabulary
at a time, each slice its own piece; the Hugging Face folder (``--save-hf``) is written one shard
per block, each block read back from the checkpoint. The whole model is never in host memory:
while the checkpoint is assembled only one slice of the vocabulary (and orbax's buffers for it);
the export holds the float embedding and head (its first shard), then one block at a time."""

from __future__ import annotations

import os
from typing import Any

import jax


def save_checkpoint(path: str, *, source, dtype: str, blocks_dir: str, qhead: dict,
                    model_config, quant_config, tokenizer, records: list,
                    extra: dict | None = None, progress: bool = False) -> None:
  """Write the orbax checkpoint of a streamed run at ``path`` (every process calls it)."""
  import numpy as np  # noqa: PLC0415

  from gptq_jax.checkpoint_parts import PartsWriter  # noqa: PLC0415
  from gptq_jax.cli.phases import Phase  # noqa: PLC0415

  writer = PartsWriter(path)
  parts = list(source.nonlayer_pieces(dtype, skip=tuple(qhead)))
  phase = Phase("checkpoint", len(parts) * len(source.vocab_chunks()) + 1,
                "parts (float embedding / head slices, then the blocks)", progress)
  done = 0

  def counted(pieces):
    nonlocal done
    for piece in pieces:
      yield piece
      done += 1
      phase.update(done)

  for key, leaf, axis, pieces in parts:  # one slice of the vocabulary in memory at a time
    writer.add_pieces(key, leaf, axis, counted(pieces))
  for key in source.other_tables(skip=tuple(qhead)):  # Gemma 4's per-layer input tables
    writer.add(key, jax.tree.map(np.asarray, source.tables(dtype, (key,))[key]))
  writer.link_blocks(blocks_dir, {f"layers_{i}": i
                                  for i in range(model_config.num_hidden_layers)})
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  rest = dict(qhead, norm={k: np.asarray(v, np_dtype) for k, v in source.final_norm().items()})
  meta = {"model_config": model_config.to_hf_dict(),  # as checkpoint.save writes it
          "compute_dtype": getattr(model_config, "dtype", "float32"),
          "quant_config": quant_config.to_dict(), "records": records, **(extra or {})}
  writer.finish(rest, meta, tokenizer)
  phase.update(phase.total)


def export_hf(folder: str, checkpoint_path: str, *, model_config, quant_config, tokenizer,
              calibration_source, write: bool = True, hf_format: str = "gptq",
              progress: bool = False) -> None:
  """``--save-hf``: the HF folder (``hf_format``: gptq or compressed-tensors) from the finished
  checkpoint, one shard per part. Under ``jax.distributed`` every process calls it (orbax's reads
  meet at barriers) and the one with ``write`` writes the folder."""
  from gptq_jax.checkpoint import PARTS, read_part, read_tree  # noqa: PLC0415
  from gptq_jax.cli.phases import Phase  # noqa: PLC0415
  from gptq_jax.interop import formats  # noqa: PLC0415
  from gptq_jax.interop.hf_gptq import block_tensors, nonlayer_tensors  # noqa: PLC0415

  rest, meta = read_tree(os.path.join(checkpoint_path, "orbax"))
  parts = meta[PARTS]
  phase = Phase("export", model_config.num_hidden_layers + 1, "shards (the float tensors, then "
                "one per block)", progress)
  nonlayer = dict(rest)
  for key, entry in parts.items():
    if entry[0] == "nonlayer":
      nonlayer[key] = read_part(checkpoint_path, key, entry)
  linear = formats.get(hf_format).linear
  writer = formats.writer(folder, model_config, quant_config, hf_format=hf_format,
                          tokenizer=tokenizer, calibration_source=calibration_source
                          ) if write else None
  if writer is not None:
    writer.add(nonlayer_tensors(model_config, nonlayer, cfg=quant_config, linear=linear))
  del nonlayer
  phase.update(1)
  for i in range(model_config.num_hidden_layers):
    sub, step, *_ = parts[f"layers_{i}"]
    block, _ = read_tree(os.path.join(checkpoint_path, sub), step)
    if writer is not None:
      writer.add(block_tensors(model_config, i, block, quant_config, linear=linear))
    phase.update(i + 2)
  if writer is not None:
    writer.finish()


SAMPLE_TOKENS = 32  # new tokens of the float and the quantized model's continuations


def sample(params, model_config, tokenizer, prompt: str) -> str:
  """A greedy continuation, cut at the first special token (an instruct model's end of turn)."""
  from gptq_jax import eval as evaluation  # noqa: PLC0415
  from gptq_jax.models import decode  # noqa: PLC0415

  ids = tokenizer(prompt)["input_ids"]
  try:
    new = evaluation.generate(params, model_config, ids,
                              max_new_tokens=SAMPLE_TOKENS)[len(ids):]
  finally:  # generate keeps the model for a next call: the float one would stay for the whole run
    decode.forget_last()
  special = set(getattr(tokenizer, "all_special_ids", []) or [])
  cut = next((k for k, t in enumerate(new.tolist()) if t in special), len(new))
  return tokenizer.decode(new[:cut], skip_special_tokens=True)


def load_for_sample(checkpoint_path: str):
  """The finished checkpoint's params on the device (for the sample generation after; every
  process calls it under ``jax.distributed``: orbax's reads meet at barriers)."""
  from gptq_jax import checkpoint  # noqa: PLC0415
  from gptq_jax.models.params import ModelParams  # noqa: PLC0415

  params = checkpoint.read(checkpoint_path).params
  return ModelParams(_to_device(dict(params)), params.config)


def _to_device(tree: dict) -> dict:
  """Each leaf put on the device and dropped from the host tree at once: the host copy of the
  model is never held whole beside the device copy."""
  for key in list(tree):
    node = tree.pop(key)
    tree[key] = _to_device(node) if type(node) is dict else jax.device_put(node)
    del node
  return tree

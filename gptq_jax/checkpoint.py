"""orbax checkpoints of quantized (or float) params, with the configs that make them loadable.

A checkpoint folder holds an orbax ``CheckpointManager`` (step 0) with two items: ``params`` (every
array of the parameter tree; each ``PackedWeight`` stored as its four HF tensors) and ``meta`` (JSON:
the model config, the GPTQ config, where the packed weights are and their static metadata, free
extra fields), plus the tokenizer files under ``tokenizer/`` when one is given. Loading rebuilds the
``PackedWeight`` nodes from ``meta``, so a reloaded tree is the tree that was saved.

Writes are atomic: orbax finalizes a step only when it is complete, and ``save`` writes into a
temporary sibling folder that is renamed into place at the end; an existing destination is never
overwritten.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gptq_jax.core.weights import PackedWeight
from gptq_jax.integrity import CHECKSUMS, DamagedFileError, verify_checksums, write_checksums
from gptq_jax.models.params import ModelParams, plain, untied

PACKED_FIELDS = ("qweight", "qzeros", "scales", "g_idx")
FORMAT_VERSION = 1
PARTS = "parts"  # the meta key of a checkpoint written a part at a time (checkpoint_parts.py)
SHAPES = "shapes"  # the meta key of every saved array's [shape, dtype] (the restore's target)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def split_packed(tree: Any) -> tuple[Any, dict[str, dict]]:
  """PackedWeight nodes -> plain dicts of their arrays, and {path: static metadata}."""
  packed: dict[str, dict] = {}

  def visit(path, x):
    if isinstance(x, PackedWeight):
      packed[_path_str(path)] = {"bits": x.bits, "group_size": x.group_size, "format": x.format}
      return {f: getattr(x, f) for f in PACKED_FIELDS}
    return x

  is_packed = lambda x: isinstance(x, PackedWeight)
  return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=is_packed), packed


def join_packed(tree: Any, packed: dict[str, dict]) -> Any:
  """Inverse of ``split_packed``."""
  for path, static in packed.items():
    keys = path.split("/")
    node = tree
    for k in keys[:-1]:
      node = node[k]
    arrays = node[keys[-1]]
    node[keys[-1]] = PackedWeight(**{f: arrays[f] for f in PACKED_FIELDS}, **static)
  return tree


def _manager(path: str, read_only: bool = False) -> ocp.CheckpointManager:
  # A read-only manager logs two warnings (read-only folder, save interval 0) that are expected.
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR if read_only else level)
  try:
    options = ocp.CheckpointManagerOptions(create=not read_only, read_only=read_only,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(path), options=options,
                                 item_names=("params", "meta"))
  finally:
    absl_logger.setLevel(level)


def write_tree(path: str, step: int, tree: Any, meta: dict) -> None:
  """Save ``tree`` (PackedWeights allowed) and JSON ``meta`` as step ``step`` under ``path``."""
  arrays, packed = split_packed(plain(tree))  # ModelParams -> dict: orbax sees plain dicts
  arrays = jax.tree.map(np.asarray, arrays)
  meta = {**meta, "packed": packed, "gptq_jax_checkpoint": FORMAT_VERSION,
          SHAPES: jax.tree.map(lambda a: [list(a.shape), a.dtype.name], arrays)}
  mngr = _manager(path)
  mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(arrays),
                                          meta=ocp.args.JsonSave(meta)))
  mngr.wait_until_finished()
  mngr.close()
  if jax.process_index() == 0:  # a collective save: one process records the files' checksums
    write_checksums(os.path.join(os.path.abspath(path), str(step)))
  if jax.process_count() > 1:  # the others wait, so every process returns with the step complete
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices(f"gptq_jax checksums {path} {step}")


def read_tree(path: str, step: int | None = None) -> tuple[Any, dict]:
  """-> (tree with PackedWeights rebuilt, meta) of step ``step`` (default: the latest)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint folder at {path!r}")
  if step is None:
    mngr = _manager(path, read_only=True)
    step = mngr.latest_step()
    mngr.close()
    if step is None:
      raise FileNotFoundError(f"{path!r} holds no finished checkpoint (an interrupted save?)")
  step_dir = _step_dir(path, step)
  verify_checksums(step_dir)  # names a damaged file (before orbax reads it)
  try:
    meta = dict(_restore(step_dir, meta=ocp.args.JsonRestore())["meta"])
    params = _restore(step_dir, params=ocp.args.StandardRestore(_target(meta.get(SHAPES))))[
        "params"]
  except (ValueError, OSError, RuntimeError, KeyError) as e:  # tensorstore / orbax read errors
    if isinstance(e, DamagedFileError):
      raise
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise DamagedFileError(step_dir, f"damaged orbax checkpoint ({first})") from None
  tree = jax.tree.map(np.asarray, params)
  return join_packed(tree, meta.get("packed", {})), meta


def _step_dir(path: str, step: int) -> str:
  """The folder of committed step ``step`` under ``path`` (orbax renames a step's folder to its
  number when the save is committed)."""
  step_dir = os.path.join(os.path.abspath(path), str(step))
  if not os.path.isdir(step_dir):
    raise FileNotFoundError(f"{path!r} holds no finished checkpoint step {step}")
  return step_dir


def _restore(step_dir: str, **items) -> Any:
  """Restore ``items`` of one committed step folder. A plain checkpointer, not a manager: a
  manager lists and reads every step's metadata when it opens (most of a 30-part checkpoint's
  load time)."""
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
      step_dir, args=ocp.args.Composite(**items))


def _target(shapes: Any) -> Any:
  """Host arrays of the saved shapes and dtypes (``meta[SHAPES]``), or None for a step written
  without them. Given the target, orbax reads no per-array metadata: about a third of the
  restore time of a model's ~900 arrays."""
  if shapes is None:
    return None
  is_spec = lambda x: isinstance(x, list) and len(x) == 2 and isinstance(x[1], str)  # noqa: E731
  return jax.tree.map(lambda s: np.empty(s[0], jnp.dtype(s[1])), shapes, is_leaf=is_spec)


def read_meta(path: str, step: int) -> dict:
  """The JSON ``meta`` of step ``step`` alone (no array is read)."""
  return dict(_restore(_step_dir(path, step), meta=ocp.args.JsonRestore())["meta"])


def steps(path: str) -> list[int]:
  """The finished steps under ``path`` (none when it does not exist)."""
  if not os.path.isdir(path):
    return []
  mngr = _manager(path, read_only=True)
  out = list(mngr.all_steps())
  mngr.close()
  return sorted(out)


def step_complete(path: str, step: int) -> bool:
  """Whether step ``step`` under ``path`` was saved to the end: orbax commits the step's folder,
  then ``write_tree`` writes its checksum table, so a save killed between the two leaves a
  committed step without a table (listed by ``steps``, not complete)."""
  return os.path.isfile(os.path.join(os.path.abspath(path), str(step), CHECKSUMS))


def table_digest(step_dir: str) -> str:
  """SHA-256 of a step's checksum table (``integrity.py``): how the top step names its parts."""
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.isfile(path):
    raise DamagedFileError(step_dir, "missing checkpoint part (no checksum table)")
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def read_parts(folder: str, params: dict, meta: dict) -> dict:
  """``params`` (the top step's tree) with every part of ``meta`` read back into place."""
  for key, entry in sorted(meta.get(PARTS, {}).items()):
    params[key] = read_part(folder, key, entry)
  return params


def _read_step(folder: str, key: str, sub: str, step: int, digest: str) -> Any:
  step_dir = os.path.join(folder, sub, str(step))
  if not os.path.isdir(step_dir):
    raise DamagedFileError(step_dir, f"missing checkpoint part ({key}, listed in the "
                           "checkpoint's meta)")
  if table_digest(step_dir) != digest:
    raise DamagedFileError(step_dir, f"checkpoint part {key} is not the one this checkpoint "
                           "was saved with (its checksum table changed)")
  tree, _ = read_tree(os.path.join(folder, sub), step)
  return tree[key] if sub == "nonlayer" else tree


def read_part(folder: str, key: str, entry: list) -> Any:
  """The subtree ``key`` of the checkpoint at ``folder`` from its ``parts`` entry (``[sub, step,
  digest]``, or with a fourth item listing the pieces it was saved in: they are copied into one
  array as they are read, so the array is held once)."""
  sub, step, digest, *pieces = entry
  if not pieces:
    return _read_step(folder, key, sub, step, digest)
  leaf, axis, listed = pieces[0]["leaf"], pieces[0]["axis"], pieces[0]["pieces"]
  out, at = None, 0
  for s, d, n in listed:
    piece = np.asarray(_read_step(folder, key, sub, s, d)[leaf])
    if piece.shape[axis] != n:
      raise DamagedFileError(os.path.join(folder, sub, str(s)), f"checkpoint part {key}: a "
                             f"piece of {piece.shape[axis]} slices where the meta lists {n}")
    if out is None:
      shape = list(piece.shape)
      shape[axis] = sum(p[2] for p in listed)
      out = np.empty(shape, piece.dtype)
    index = [slice(None)] * out.ndim
    index[axis] = slice(at, at + n)
    out[tuple(index)] = piece
    at += n
  return {leaf: out}


class Checkpoint(NamedTuple):
  params: Any
  model_config: Any  # ModelConfig
  quant_config: Any  # GPTQConfig or None (a float checkpoint)
  meta: dict
  tokenizer_dir: str | None

  @property
  def tokenizer(self) -> Any:
    """The checkpoint's transformers tokenizer (loaded on first use, then reused), or None when
    the checkpoint was saved without one."""
    return None if self.tokenizer_dir is None else _load_tokenizer(self.tokenizer_dir)


@functools.lru_cache(maxsize=4)
def _load_tokenizer(folder: str) -> Any:
  from gptq_jax.models import load_tokenizer  # noqa: PLC0415

  return load_tokenizer(folder)


def check_output(path: str) -> None:
  """Raise now what ``save(path, ...)`` would raise after the work: ``path`` exists (nothing is
  ever overwritten), or a file or an unwritable folder stands where it would be created. Call it
  before quantizing, so a bad output folder fails in a second, not after minutes."""
  path = os.path.abspath(path)
  if os.path.exists(path):
    raise FileExistsError(f"{path!r} already exists: choose another output folder (nothing was "
                          "overwritten)")
  check_creatable(path)


def check_creatable(path: str) -> None:
  """The nearest existing folder above ``path`` (missing ones are created when written) must be a
  writable folder: one clear error otherwise."""
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise NotADirectoryError(f"{path!r}: {parent!r} is a file, not a folder")
  if not os.access(parent, os.W_OK):
    raise PermissionError(f"{path!r}: the folder {parent!r} is not writable")


def save(path: str, params: Any, *, model_config: Any, quant_config: Any = None,
         tokenizer: Any = None, extra: dict | None = None) -> None:
  """Write a loadable checkpoint folder at ``path``; refuses to overwrite anything (the same
  checks as ``check_output``, which callers run before the work)."""
  path = os.path.abspath(path)
  check_output(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".saving"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)  # a save that was killed midway: never a finished checkpoint
  model_config = untied(model_config, params)  # lm_head=True: the projection is its own tensor
  meta = {
      "model_config": model_config.to_hf_dict(),
      "compute_dtype": getattr(model_config, "dtype", "float32"),
      "quant_config": None if quant_config is None else quant_config.to_dict(),
      **(extra or {}),
  }
  write_tree(os.path.join(tmp, "orbax"), 0, params, meta)
  if tokenizer is not None:
    tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
  os.rename(tmp, path)


def is_checkpoint(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "orbax"))


def load(path: str) -> Checkpoint:
  """Read a folder written by ``save`` (or by the CLI, a part at a time). Every other format (HF
  GPTQ or float folders, .gguf files, embedded names) is read by ``gptq_jax.open_model`` /
  ``gptq_jax.load_model`` (``gptq_jax/loading.py``)."""
  return read(path)


def read(path: str) -> Checkpoint:
  """Read a folder written by ``save``."""
  from gptq_jax.config import GPTQConfig
  from gptq_jax.models import ModelConfig

  if not is_checkpoint(path):
    raise FileNotFoundError(f"{path!r} is not a gptq_jax checkpoint folder (no orbax/ inside); "
                            "gptq_jax.load_model reads every other model format")
  params, meta = read_tree(os.path.join(path, "orbax"))
  if PARTS in meta:  # written a part at a time (the streamed CLI): put the parts back in place
    params = read_parts(path, params, meta)
  model_config = ModelConfig.from_hf_dict(meta["model_config"]).replace(
      dtype=meta.get("compute_dtype", "float32"))
  qc = meta.get("quant_config")
  quant_config = None if qc is None else GPTQConfig.from_dict(qc)
  if quant_config is not None:  # the packed kernels run on the backend the run was configured for
    model_config = model_config.replace(backend=quant_config.backend)
  tok = os.path.join(path, "tokenizer")
  params = ModelParams(params, model_config)  # they carry their config, as loaded params do
  return Checkpoint(params, model_config, quant_config, meta, tok if os.path.isdir(tok) else None)

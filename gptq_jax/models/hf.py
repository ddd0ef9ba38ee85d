"""Hugging Face folders: `config.json` + `model.safetensors` (or a sharded index) <-> our params.

HF stores linear weights `[out, in]`; our kernels are `[in, out]`. Safetensors are memory-mapped and
read tensor by tensor, so `load_layer_params` reads one decoder layer without touching the rest.
PyTorch `.bin` checkpoints are read only with `torch.load(weights_only=True)` (no pickle code runs).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gptq_jax.models.config import ModelConfig
from gptq_jax.models.families import (ATTN_PROJS, MLP_PROJS, embedding_keys,  # noqa: F401
                                      hf_names, layer_expert_specs, layer_tensor_specs,
                                      nonlayer_tensor_specs)
from gptq_jax.models.params import ModelParams
from gptq_jax.models.safetensors_io import SafetensorsFile, save_safetensors

Params = dict[str, Any]
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _set(tree: Params, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def host_array(x: Any, dtype: Any) -> np.ndarray:
  """``x`` as a numpy array in ``dtype`` (bfloat16 included; a view when no cast is needed)."""
  import ml_dtypes  # noqa: F401,PLC0415 (bfloat16 for numpy)

  return np.asarray(x, np.dtype(jnp.dtype(dtype)))


def to_device(x: Any, dtype: Any) -> jax.Array:
  """A host array on the device in ``dtype``, cast on the host first: ``jnp.asarray(x, dtype)``
  holds about three times the result while it converts (measured), ``device_put`` one copy."""
  return jax.device_put(host_array(x, dtype))


def params_from_tensors(specs, get, dtype: Any = jnp.float32, host: bool = False) -> Params:
  """Builds a params subtree from `get(hf_name, hf_shape) -> np.ndarray` (HF layout): device
  arrays in `dtype` (`to_device`), or with `host=True` numpy arrays in `dtype` (views of the
  file's map where no cast is needed)."""
  out: Params = {}
  for path, name, shape in specs:
    value = get(name, shape)
    if path[-1] == "kernel":
      value = value.T  # HF [out, in] -> Flax [in, out]
    _set(out, path, host_array(value, dtype) if host else to_device(value, dtype))
  return out


def merge_into(tree: Params, other: Params) -> Params:
  """`other`'s leaves set into the nested dict `tree` (in place; returns it)."""
  for key, value in other.items():
    if isinstance(value, dict) and isinstance(tree.get(key), dict):
      merge_into(tree[key], value)
    else:
      tree[key] = value
  return tree


def experts_from_tensors(specs, get, has, dtype: Any = jnp.float32) -> Params:
  """Stacked expert kernels `[E, in, out]` (moe_families.ExpertSpec) from the per-expert HF tensors
  when all are there (`has(name)`), else from transformers 5's fused tensor."""
  out: Params = {}
  for spec in specs:
    if all(has(n) for n in spec.names):
      value = np.stack([np.asarray(get(n, spec.shape)) for n in spec.names])  # [E, out, in]
    elif has(spec.fused_name):
      rows = spec.shape[0]
      value = np.asarray(get(spec.fused_name, spec.fused_shape))[
          :, spec.part * rows:(spec.part + 1) * rows]
    else:
      missing = next(n for n in spec.names if not has(n))
      raise ValueError(f"the checkpoint has neither {missing!r} (experts one by one) nor "
                       f"{spec.fused_name!r} (experts fused)")
    _set(out, spec.path, jnp.asarray(np.swapaxes(value, 1, 2), dtype=dtype))
  return out


def layer_from_tensors(cfg: ModelConfig, i: int, get, has, dtype: Any = jnp.float32) -> Params:
  """Decoder layer i's params: one HF tensor per leaf, plus a sparse layer's stacked experts."""
  out = params_from_tensors(layer_tensor_specs(cfg, i), get, dtype)
  return merge_into(out, experts_from_tensors(layer_expert_specs(cfg, i), get, has, dtype))


def _resolving(cfg: ModelConfig, get, has):
  """(get, has) that also find a tensor under its alternative names (families.hf_names)."""
  def resolve(name: str) -> str:
    return next((n for n in hf_names(cfg, name) if has(n)), name)
  return (lambda name, shape: get(resolve(name), shape)), (lambda name: has(resolve(name)))


def model_params_from_tensors(cfg: ModelConfig, get, dtype: Any = jnp.float32,
                              has=None) -> ModelParams:
  """The whole params tree (carrying `cfg`) from `get(hf_name, hf_shape) -> np.ndarray` (HF
  layout, HF names: every loader maps its tensors to HF names and comes through here) and
  `has(hf_name) -> bool` (needed for mixture-of-experts models only)."""
  get, has = _resolving(cfg, get, has or (lambda name: True))
  params = params_from_tensors(nonlayer_tensor_specs(cfg), get, dtype)
  for i in range(cfg.num_hidden_layers):
    params[f"layers_{i}"] = layer_from_tensors(cfg, i, get, has, dtype)
  return ModelParams(params, cfg)


def from_hf_state_dict(cfg: ModelConfig, state_dict: Mapping[str, Any],
                       dtype: Any = jnp.float32) -> ModelParams:
  """Params from an in-memory HF state dict (numpy arrays or torch tensors, HF names/layout)."""

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in state_dict:
      raise ValueError(f"state dict is missing tensor {name!r}")
    value = state_dict[name]
    if hasattr(value, "detach"):  # torch
      value = value.detach().float().cpu().numpy()
    value = np.asarray(value)
    if value.shape != tuple(shape):
      raise ValueError(f"tensor {name!r} has shape {value.shape}, expected {tuple(shape)}")
    return value

  return model_params_from_tensors(cfg, get, dtype, has=lambda name: name in state_dict)


class _TorchBinFile:
  """A PyTorch checkpoint read with `weights_only=True` (tensors only; refuses arbitrary pickles)."""

  def __init__(self, path: str):
    try:
      import torch  # noqa: PLC0415 (optional dependency)
    except ImportError:
      raise ValueError(f"{path} is a PyTorch .bin checkpoint and torch is not installed; convert "
                       "it to safetensors or `pip install torch` (read with weights_only=True)") from None
    self._torch = torch
    try:
      self._sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 (torch raises UnpicklingError and others)
      raise ValueError(f"refusing to load {path}: not a weights-only PyTorch checkpoint ({e})") from None

  def keys(self) -> list[str]:
    return list(self._sd)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._sd[name].shape)

  def get(self, name: str) -> np.ndarray:
    t = self._sd[name]
    return (t.float() if t.dtype == self._torch.bfloat16 else t).numpy()  # numpy has no bf16

  def close(self) -> None:
    pass


class HFCheckpoint:
  """An HF model folder (any supported family) opened lazily: `.config`, `.layer_params(i)`, `.nonlayer_params()`."""

  def __init__(self, folder: str | os.PathLike):
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"model folder {folder!r} does not exist")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
      raise FileNotFoundError(f"{folder!r} has no config.json: not a Hugging Face model folder")
    with open(config_path) as f:
      self.config = ModelConfig.from_hf_dict(json.load(f))
    self.folder = folder
    self._files: dict[str, Any] = {}
    self._where = self._index_weights()  # tensor name -> file path

  def _index_weights(self) -> dict[str, str]:
    path = lambda name: os.path.join(self.folder, name)  # noqa: E731
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
      if os.path.isfile(path(index_name)):
        with open(path(index_name)) as f:
          weight_map = json.load(f)["weight_map"]
        return {name: path(file) for name, file in weight_map.items()}
    for single in ("model.safetensors", "pytorch_model.bin"):
      if os.path.isfile(path(single)):
        return {name: path(single) for name in self._open(path(single)).keys()}
    raise FileNotFoundError(
        f"{self.folder!r} has no weights: expected model.safetensors, model.safetensors.index.json "
        "(sharded), or pytorch_model.bin[.index.json]")

  def _open(self, file: str):
    if file not in self._files:
      if not os.path.isfile(file):
        raise FileNotFoundError(f"weight file {file!r} (named in the index) does not exist")
      self._files[file] = (_TorchBinFile(file) if file.endswith(".bin") else SafetensorsFile(file))
    return self._files[file]

  def tensor_names(self) -> list[str]:
    return list(self._where)

  def has(self, name: str) -> bool:
    """Whether the checkpoint holds `name` (under this or an alternative name)."""
    return any(n in self._where for n in hf_names(self.config, name))

  def resolve(self, name: str) -> str:
    """The name `name` has in this checkpoint (families.hf_names)."""
    return next((n for n in hf_names(self.config, name) if n in self._where), name)

  def get(self, name: str, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """An HF tensor (HF layout), checked against `expected_shape`."""
    name = self.resolve(name)
    if name not in self._where:
      raise ValueError(f"checkpoint {self.folder!r} is missing tensor {name!r}")
    reader = self._open(self._where[name])
    shape = reader.shape(name)
    if expected_shape is not None and shape != tuple(expected_shape):
      raise ValueError(f"tensor {name!r} has shape {shape}, but config.json implies "
                       f"{tuple(expected_shape)} (checkpoint {self.folder!r})")
    return reader.get(name)

  def rows(self, name: str, lo: int, hi: int) -> np.ndarray:
    """Rows ``lo:hi`` of an HF tensor (HF layout, its own dtype), read without mapping the rest
    (safetensors; a PyTorch .bin tensor is sliced from its map)."""
    if name not in self._where:
      raise ValueError(f"checkpoint {self.folder!r} is missing tensor {name!r}")
    reader = self._open(self._where[name])
    if hasattr(reader, "rows"):
      return reader.rows(name, lo, hi)
    return np.array(reader.get(name)[lo:hi])

  def layer_params(self, i: int, dtype: Any = jnp.float32) -> Params:
    """The params of decoder layer `i` (reads only that layer's tensors)."""
    if not 0 <= i < self.config.num_hidden_layers:
      raise IndexError(f"layer {i} out of range [0, {self.config.num_hidden_layers})")
    return layer_from_tensors(self.config, i, self.get, self.has, dtype)

  def nonlayer_params(self, dtype: Any = jnp.float32) -> Params:
    """embed_tokens, norm and (untied) lm_head."""
    return params_from_tensors(nonlayer_tensor_specs(self.config), self.get, dtype)

  def params(self, dtype: Any = jnp.float32) -> ModelParams:
    params = model_params_from_tensors(self.config, self.get, dtype, self.has)
    self._warn_unexpected()
    return params

  def _warn_unexpected(self) -> None:
    cfg = self.config
    known = {name for _, name, _ in nonlayer_tensor_specs(cfg)} | {"lm_head.weight"}
    for i in range(cfg.num_hidden_layers):
      known |= {self.resolve(name) for _, name, _ in layer_tensor_specs(cfg, i)}
      for spec in layer_expert_specs(cfg, i):
        known |= {self.resolve(n) for n in spec.names} | {spec.fused_name}
    extra = [n for n in self._where if n not in known and not n.endswith(_IGNORED_SUFFIXES)]
    if extra:
      warnings.warn(f"{self.folder!r}: ignoring {len(extra)} unexpected tensors, e.g. {extra[:3]}",
                    stacklevel=3)

  def close(self) -> None:
    for reader in self._files.values():
      reader.close()
    self._files.clear()


def load_hf_folder(folder: str | os.PathLike, dtype: Any = jnp.float32
                   ) -> tuple[ModelConfig, ModelParams]:
  """(config, params) of an HF folder of any supported family; params cast to `dtype` and
  carrying the config (`params.config`)."""
  ckpt = HFCheckpoint(folder)
  try:
    return ckpt.config, ckpt.params(dtype)
  finally:
    ckpt.close()


def load_hf_config(folder: str | os.PathLike) -> ModelConfig:
  return HFCheckpoint(folder).config


def load_layer_params(folder: str | os.PathLike, cfg: ModelConfig | None, i: int,
                      dtype: Any = jnp.float32) -> Params:
  """Decoder layer `i` alone (memory-mapped reads). `cfg` None: read from the folder."""
  ckpt = HFCheckpoint(folder)
  if cfg is not None:
    ckpt.config = cfg
  try:
    return ckpt.layer_params(i, dtype)
  finally:
    ckpt.close()


def load_nonlayer_params(folder: str | os.PathLike, cfg: ModelConfig | None = None,
                         dtype: Any = jnp.float32) -> Params:
  """embed_tokens, norm and (untied) lm_head alone."""
  ckpt = HFCheckpoint(folder)
  if cfg is not None:
    ckpt.config = cfg
  try:
    return ckpt.nonlayer_params(dtype)
  finally:
    ckpt.close()


def to_hf_state_dict(cfg: ModelConfig, params: Params, dtype: Any = None) -> dict[str, np.ndarray]:
  """HF-named numpy tensors (HF layout) from dense params; `dtype` None keeps each tensor's dtype."""
  specs = list(nonlayer_tensor_specs(cfg))
  for i in range(cfg.num_hidden_layers):
    specs += [((f"layers_{i}",) + path, name, shape) for path, name, shape in
              layer_tensor_specs(cfg, i)]
  out = {}
  for path, name, shape in specs:
    value = params
    for key in path:
      value = value[key]
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
      raise ValueError(f"{'/'.join(path)} is not a dense array ({type(value).__name__}): "
                       "only float params can be saved as a Hugging Face float folder")
    value = np.asarray(value)
    if path[-1] == "kernel":
      value = value.T
    if value.shape != tuple(shape):
      raise ValueError(f"{'/'.join(path)} has shape {value.shape}, expected {tuple(shape)} (HF)")
    out[name] = np.ascontiguousarray(value if dtype is None else value.astype(dtype))
  for i in range(cfg.num_hidden_layers):
    for spec in layer_expert_specs(cfg, i):
      stacked = params[f"layers_{i}"]
      for key in spec.path:
        stacked = stacked[key]
      if not hasattr(stacked, "shape") or not hasattr(stacked, "dtype"):
        raise ValueError(f"layers_{i}/{'/'.join(spec.path)} is not a dense array: only float "
                         "params can be saved as a Hugging Face float folder")
      out.update(float_expert_tensors(spec, np.asarray(stacked), dtype, out))
  return out


def float_expert_tensors(spec, stacked: np.ndarray, dtype: Any, written: dict) -> dict:
  """HF tensors of float experts `stacked` `[E, in, out]`: one per expert, as transformers writes
  them, or (`spec.saved_fused`, Gemma 4) this projection's rows of the fused `[E, parts * out,
  in]` tensor, which `written` may already hold (the other part)."""
  hf = np.swapaxes(stacked if dtype is None else stacked.astype(dtype), 1, 2)  # [E, out, in]
  if not spec.saved_fused:
    return {name: np.ascontiguousarray(w) for name, w in zip(spec.names, hf)}
  fused = written.get(spec.fused_name, np.zeros(spec.fused_shape, hf.dtype))
  rows = spec.shape[0]
  fused[:, spec.part * rows:(spec.part + 1) * rows] = hf
  return {spec.fused_name: fused}


def save_hf_folder(folder: str | os.PathLike, cfg: ModelConfig | None, params: Params,
                   dtype: Any = np.float32, *, max_shard_bytes: int | None = None) -> None:
  """Writes `config.json` + `model.safetensors` that transformers loads as the family's CausalLM
  (`cfg.to_hf_dict()["architectures"]`). `cfg` None: `params.config`. With `max_shard_bytes`,
  tensors go to `model-0000k-of-0000n.safetensors` shards of at most that size (a tensor larger
  than it gets a shard of its own) plus `model.safetensors.index.json`; `dtype` None keeps each
  tensor's dtype (bfloat16 included)."""
  cfg = cfg if cfg is not None else getattr(params, "config", None)
  if cfg is None:
    raise ValueError("save_hf_folder needs cfg=<ModelConfig> or params that carry their config")
  os.makedirs(folder, exist_ok=True)
  tensors = to_hf_state_dict(cfg, params, dtype)
  torch_dtype = np.dtype(tensors["model.embed_tokens.weight"].dtype).name
  config = dict(cfg.to_hf_dict(), torch_dtype=torch_dtype)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  if max_shard_bytes is None:
    save_safetensors(os.path.join(folder, "model.safetensors"), tensors, metadata={"format": "pt"})
    return
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  weight_map = {}
  for k, shard in enumerate(shards):
    file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    save_safetensors(os.path.join(folder, file), shard, metadata={"format": "pt"})
    weight_map.update({name: file for name in shard})
  index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
           "weight_map": weight_map}
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f, indent=2)

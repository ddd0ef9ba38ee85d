"""Hugging Face GPTQ folders <-> gptq_jax params (docs/format.md).

A folder holds ``config.json`` (the model config plus ``quantization_config``), the same dict in
``quantize_config.json`` (read by AutoGPTQ / GPTQModel), ``model.safetensors`` (or shards with a
``model.safetensors.index.json``) and the tokenizer files. Each quantized linear ``<name>`` (e.g.
``model.layers.0.self_attn.q_proj``) is stored as ``<name>.qweight`` int32 ``[K*b/32, N]``,
``<name>.qzeros`` int32 ``[G, N*b/32]``, ``<name>.scales`` float16 ``[G, N]`` and ``<name>.g_idx``
int32 ``[K]``; every other tensor (embeddings, norms, an untied lm_head, biases) is a float tensor
under its usual Hugging Face name. Reading goes through ``HFCheckpoint`` (memory-mapped, one tensor
at a time), so a folder larger than RAM can be read block by block.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Any

import jax.numpy as jnp
import numpy as np

from gptq_jax.config import GPTQConfig
from gptq_jax.core import packing
from gptq_jax.interop import calibration
from gptq_jax.core.weights import PackedWeight, QuantizedWeight, stack_weights, unstack_weights
from gptq_jax.models.config import ModelConfig
from gptq_jax.models.families import module_tensor_name
from gptq_jax.models.hf import (HFCheckpoint, Params, experts_from_tensors, float_expert_tensors,
                                layer_expert_specs, layer_tensor_specs, merge_into,
                                nonlayer_tensor_specs, params_from_tensors)
from gptq_jax.models.params import ModelParams
from gptq_jax.models.safetensors_io import save_safetensors
from gptq_jax.pipeline.dynamic import LM_HEAD, resolve, untied
from gptq_jax.pipeline.experts import block_module_names

PACKED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
GEMMA4_EXPERTS_WARNING = (
    "this Gemma 4 export has quantized experts (model.layers.{i}.experts.{e}.*_proj.qweight ...): "
    "gptq_jax.interop.import_hf reads them, but transformers 5.25 (with GPTQModel 7.7 / Optimum) "
    "cannot: its Gemma 4 experts are fused parameters, not nn.Linear modules, and it leaves them "
    "randomly initialized. Keep the experts in float (dynamic '-:.*experts.*') for a folder "
    "transformers runs")
FLOAT_DTYPES = ("float16", "bfloat16", "float32")
_SAFETENSORS_META = {"format": "pt"}
_META_KEYS = ("damp_percent", "static_groups", "true_sequential", "act_group_aware")


# ----- config dicts ----------------------------------------------------------------------------

def quantization_config(cfg: GPTQConfig, format: str | None = None,
                        calibration_source: dict | None = None) -> dict[str, Any]:
  """The ``quantization_config`` written beside the weights (docs/format.md keys).

  ``backend`` is left out: which kernel serves a checkpoint is the loader's choice, not a property
  of the weights. ``format`` and ``checkpoint_format`` both name the packing (``gptq``/``gptq_v2``).
  ``dataset`` is a named set, a list of strings or null (what transformers' GPTQConfig accepts);
  ``meta.calibration`` says what the calibration data was, without local paths.
  """
  d = cfg.to_dict()
  d.pop("backend", None)
  fmt = format or cfg.format
  d["format"] = d["checkpoint_format"] = fmt
  d["dataset"] = calibration.hf_dataset(cfg.dataset)
  d["meta"] = {**d.get("meta", {}), "calibration": calibration_source
               or calibration.describe(cfg.dataset, cfg.nsamples, cfg.seqlen)}
  if cfg.desc_act and cfg.static_groups and cfg.group_size != -1:
    # Act-order with static groups keeps every group in input order (g_idx[i] = i // group_size):
    # to a loader that is desc_act=False, and vLLM refuses desc_act=True. The act order the
    # columns were solved in is kept under meta (read back by read_quantization_config).
    d["desc_act"] = False
    d["meta"]["desc_act"] = True
  return d


def _float_dtype(dtype: Any) -> np.dtype:
  import ml_dtypes  # noqa: PLC0415 (a jax dependency)

  name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
  if name not in FLOAT_DTYPES:
    raise ValueError(f"dtype={dtype!r} is not allowed for the float tensors: use one of "
                     f"{FLOAT_DTYPES}")
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def write_configs(folder: str, model_config: ModelConfig, cfg: GPTQConfig, dtype: Any,
                  tokenizer: Any = None, *, calibration_source: dict | None = None) -> None:
  """config.json (with quantization_config), quantize_config.json and the tokenizer files."""
  qc = quantization_config(cfg, calibration_source=calibration_source)
  if model_config.num_experts:  # only these linears are quantized (pipeline/experts.py)
    qc["modules_in_block_to_quantize"] = block_module_names(model_config, cfg)
    if model_config.dense_mlp_beside_experts and any("experts." in name for group in qc[
        "modules_in_block_to_quantize"] for name in group):
      warnings.warn(GEMMA4_EXPERTS_WARNING, UserWarning, stacklevel=3)
  config = dict(model_config.to_hf_dict(), torch_dtype=_float_dtype(dtype).name,
                quantization_config=qc)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(folder, "quantize_config.json"), "w") as f:
    json.dump(qc, f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(folder)


# ----- params -> tensors -----------------------------------------------------------------------

def _packed_in(kernel: Any, cfg: GPTQConfig | None, name: str) -> PackedWeight:
  """``kernel`` as a PackedWeight in ``cfg.format`` (repacked if it was packed otherwise)."""
  if cfg is None:
    raise ValueError(f"{name} is quantized: pass the GPTQConfig to write it")
  if isinstance(kernel, PackedWeight):
    if kernel.format == cfg.format:
      return kernel
    kernel = kernel.unpack()
  if isinstance(kernel, QuantizedWeight):
    return kernel.pack(cfg.format)
  raise ValueError(f"{name}: expected a PackedWeight or QuantizedWeight, got {type(kernel).__name__}")


def _packed_tensors(w: PackedWeight, name: str, hf_shape: tuple[int, int]) -> dict[str, np.ndarray]:
  n, k = hf_shape
  if w.shape != (k, n):
    raise ValueError(f"{name}: packed weight is [in, out] = {list(w.shape)}, but the model config "
                     f"implies {[k, n]}")
  scales = np.asarray(w.scales, np.float32)
  scales16 = scales.astype(np.float16)
  if not np.all(np.isfinite(scales16)):
    raise ValueError(f"{name}: scales up to {np.abs(scales).max():.3g} do not fit float16 (the "
                     "format's scale dtype; the largest float16 is 65504)")
  return {f"{name}.qweight": np.asarray(w.qweight, np.int32),
          f"{name}.qzeros": np.asarray(w.qzeros, np.int32),
          f"{name}.scales": scales16,
          f"{name}.g_idx": np.asarray(w.g_idx, np.int32)}


def gptq_linear(w: PackedWeight | QuantizedWeight, cfg: GPTQConfig | None, name: str,
                hf_shape: tuple[int, int], dtype: np.dtype) -> dict[str, np.ndarray]:
  """The GPTQ tensors of one quantized linear ``name`` (``<name>.qweight`` ...)."""
  del dtype  # GPTQ scales are float16 whatever the float tensors are
  return _packed_tensors(_packed_in(w, cfg, name), name, hf_shape)


def _tensors(specs, tree: Params, cfg: GPTQConfig, dtype: np.dtype, linear=gptq_linear
             ) -> dict[str, np.ndarray]:
  """HF-named tensors for ``specs`` from a params (sub)tree; each quantized kernel written by
  ``linear(weight, cfg, name, hf_shape, dtype)`` (the format's per-linear tensors)."""
  out: dict[str, np.ndarray] = {}
  for path, name, shape in specs:
    value = tree
    for key in path:
      value = value[key]
    if path[-1] == "kernel" and isinstance(value, (PackedWeight, QuantizedWeight)):
      out.update(linear(value, cfg, name[:-len(".weight")], shape, dtype))
      continue
    value = np.asarray(value)
    if path[-1] == "kernel":
      value = value.T  # Flax [in, out] -> HF [out, in]
    if value.shape != tuple(shape):
      raise ValueError(f"{'/'.join(path)} has shape {value.shape}, expected {tuple(shape)} (HF)")
    out[name] = np.ascontiguousarray(value.astype(dtype))
  return out


def _expert_tensors(specs, tree: Params, cfg: GPTQConfig, dtype: np.dtype, linear=gptq_linear
                    ) -> dict[str, np.ndarray]:
  """A sparse block's experts, one HF linear per expert (``...experts.{e}.gate_proj.qweight`` ...,
  each written by ``linear``), or, for experts left in float, ``.weight`` or the model's fused
  tensors, as transformers writes them."""
  out: dict[str, np.ndarray] = {}
  for spec in specs:
    value = tree
    for key in spec.path:
      value = value[key]
    if isinstance(value, (PackedWeight, QuantizedWeight)):
      for name, w in zip(spec.names, unstack_weights(value)):
        out.update(linear(w, cfg, name[:-len(".weight")], spec.shape, dtype))
      continue
    out.update(float_expert_tensors(spec, np.asarray(value), dtype, out))
  return out


def block_tensors(model_config: ModelConfig, i: int, block: Params, cfg: GPTQConfig,
                  dtype: Any = "float16", linear=gptq_linear) -> dict[str, np.ndarray]:
  """The HF tensors of decoder block ``i`` (its params tree ``block``), named as in transformers
  5's modules with one module per expert (Mixtral: ``mlp.experts.{e}.gate_proj``, not the float
  files' ``block_sparse_moe.experts.{e}.w1``)."""
  out = _tensors(layer_tensor_specs(model_config, i), block, cfg, _float_dtype(dtype), linear)
  out.update(_expert_tensors(layer_expert_specs(model_config, i), block, cfg, _float_dtype(dtype),
                             linear))
  return {module_tensor_name(model_config, name): value for name, value in out.items()}


def nonlayer_tensors(model_config: ModelConfig, params: Params, dtype: Any = "float16",
                     cfg: GPTQConfig | None = None, linear=gptq_linear) -> dict[str, np.ndarray]:
  """embed_tokens, norm and (untied) lm_head as HF tensors; a quantized lm_head (``lm_head=True``)
  is written packed, as GPTQModel does (``lm_head.qweight`` ...), which needs ``cfg``."""
  model_config = untied(model_config, params)
  return _tensors(nonlayer_tensor_specs(model_config), params, cfg, _float_dtype(dtype), linear)


# ----- writing ---------------------------------------------------------------------------------

class FolderWriter:
  """Writes an HF GPTQ folder atomically: into ``<path>.partial``, renamed at ``finish()``.

  ``add(tensors)`` writes one safetensors shard at once (so a block can be freed after it);
  ``finish()`` writes the configs and, for several shards, ``model.safetensors.index.json``. With
  a single shard the file is ``model.safetensors``. Refuses an existing ``path``.
  """

  def __init__(self, path: str | os.PathLike, model_config: ModelConfig, cfg: GPTQConfig, *,
               dtype: Any = "float16", tokenizer: Any = None,
               calibration_source: dict | None = None, configs=None):
    self.path = os.path.abspath(os.fspath(path))
    if os.path.exists(self.path):
      raise FileExistsError(f"{self.path!r} already exists: choose another folder for the Hugging "
                            "Face export (nothing was overwritten)")
    if not os.path.isdir(os.path.dirname(self.path)):
      raise FileNotFoundError(f"the parent folder of {self.path!r} does not exist")
    self.model_config, self.cfg, self.tokenizer = model_config, cfg, tokenizer
    self.calibration_source = calibration_source
    self.configs = configs or write_configs  # the format's config.json writer
    self.dtype = _float_dtype(dtype)
    self.tmp = self.path + ".partial"
    if os.path.exists(self.tmp):
      shutil.rmtree(self.tmp)  # an export that was killed midway
    os.makedirs(self.tmp)
    self._shards: list[tuple[str, list[str], int]] = []  # (file, names, bytes)

  def add(self, tensors: dict[str, np.ndarray]) -> None:
    file = os.path.join(self.tmp, f"shard-{len(self._shards):05d}.safetensors")
    save_safetensors(file, tensors, metadata=_SAFETENSORS_META)
    self._shards.append((file, sorted(tensors), sum(t.nbytes for t in tensors.values())))

  def finish(self) -> str:
    n = len(self._shards)
    if n == 1:
      os.rename(self._shards[0][0], os.path.join(self.tmp, "model.safetensors"))
    else:
      weight_map = {}
      for k, (file, names, _) in enumerate(self._shards):
        final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        os.rename(file, os.path.join(self.tmp, final))
        weight_map.update({name: final for name in names})
      index = {"metadata": {"total_size": sum(s[2] for s in self._shards)},
               "weight_map": dict(sorted(weight_map.items()))}
      with open(os.path.join(self.tmp, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    self.configs(self.tmp, self.model_config, self.cfg, self.dtype, self.tokenizer,
                 calibration_source=self.calibration_source)
    os.rename(self.tmp, self.path)
    return self.path


def export_hf(path: str | os.PathLike, qparams: Params, model_config: ModelConfig,
              cfg: GPTQConfig, tokenizer: Any = None, *, dtype: Any = "float16",
              calibration_source: dict | None = None, linear=gptq_linear, configs=None) -> str:
  """Writes a Hugging Face GPTQ folder (transformers / GPTQModel / vLLM load it) from ``quantize``'s
  result. Packed kernels are written in ``cfg.format`` (repacked if they were packed in the other
  format); the float tensors are cast to ``dtype``. Refuses to overwrite ``path``. ``linear`` and
  ``configs`` write another layout of the same folder (``interop/formats.py``).
  """
  if not isinstance(cfg, GPTQConfig):
    raise ValueError(f"cfg must be a gptq_jax.GPTQConfig, got {type(cfg).__name__}")
  model_config = untied(model_config, qparams)  # a quantized lm_head is its own tensor
  writer = FolderWriter(path, model_config, cfg, dtype=dtype, tokenizer=tokenizer,
                        calibration_source=calibration_source, configs=configs)
  try:
    tensors = nonlayer_tensors(model_config, qparams, dtype, cfg, linear)
    for i in range(model_config.num_hidden_layers):
      tensors.update(block_tensors(model_config, i, qparams[f"layers_{i}"], cfg, dtype, linear))
    writer.add(tensors)
    return writer.finish()
  except BaseException:
    shutil.rmtree(writer.tmp, ignore_errors=True)
    raise


# ----- reading ---------------------------------------------------------------------------------

def read_quantization_config(folder: str) -> GPTQConfig:
  """The GPTQConfig of a GPTQ folder (config.json's quantization_config, else quantize_config.json)."""
  qc = None
  with open(os.path.join(folder, "config.json")) as f:
    qc = json.load(f).get("quantization_config")
  legacy = os.path.join(folder, "quantize_config.json")
  if qc is None and os.path.isfile(legacy):
    with open(legacy) as f:
      qc = json.load(f)
  if qc is None:
    raise ValueError(f"{folder!r} is not a GPTQ folder: config.json has no quantization_config and "
                     "there is no quantize_config.json (a float folder loads with load_model)")
  return config_from_dict(qc)


def config_from_dict(qc: dict[str, Any]) -> GPTQConfig:
  """The GPTQConfig of a ``quantization_config`` dict (ours, GPTQModel's or AutoGPTQ's)."""
  qc = dict(qc)
  meta = qc.get("meta") if isinstance(qc.get("meta"), dict) else {}
  for key in _META_KEYS:  # GPTQModel 7 keeps these under "meta"
    if qc.get(key) is None and meta.get(key) is not None:
      qc[key] = meta[key]
  if meta.get("desc_act") is True and qc.get("static_groups"):  # see quantization_config
    qc["desc_act"] = True
  if qc.get("desc_act") and qc.get("act_group_aware") is None:
    qc["act_group_aware"] = False  # act-order checkpoints never use GAR
  return GPTQConfig.from_dict(qc)


def _read_packed(ckpt: HFCheckpoint, name: str, hf_shape: tuple[int, int], cfg: GPTQConfig
                 ) -> PackedWeight:
  get, n, k = ckpt.get, hf_shape[0], hf_shape[1]
  qweight = np.asarray(get(f"{name}.qweight", None))
  if qweight.ndim != 2 or qweight.shape[1] != n or (qweight.shape[0] * 32) % k:
    raise ValueError(f"{name}.qweight has shape {qweight.shape}: expected [in * bits / 32, {n}] "
                     f"with in = {k}")
  bits = qweight.shape[0] * 32 // k
  packing.run_shape(bits)  # names the unsupported bit width
  cfg = resolve(cfg, name) or cfg  # dynamic: this module's group size
  if bits != cfg.bits:
    raise ValueError(f"{name}.qweight holds {bits}-bit codes, but quantization_config gives this "
                     f"module {cfg.bits} bits (check its dynamic rules)")
  group_size = cfg.group_size if cfg.group_size != -1 else k
  groups = -(-k // group_size)
  qzeros = get(f"{name}.qzeros", (groups, n * bits // 32))
  scales = get(f"{name}.scales", (groups, n))
  if f"{name}.g_idx" in ckpt.tensor_names():
    g_idx = np.asarray(get(f"{name}.g_idx", (k,)), np.int32)
  else:  # old checkpoints without g_idx: the trivial grouping
    g_idx = np.arange(k, dtype=np.int32) // group_size
  if g_idx.min() < 0 or g_idx.max() >= groups:
    raise ValueError(f"{name}.g_idx holds groups [{g_idx.min()}, {g_idx.max()}], outside "
                     f"[0, {groups})")
  return PackedWeight(qweight=jnp.asarray(qweight, jnp.int32), qzeros=jnp.asarray(qzeros, jnp.int32),
                      scales=jnp.asarray(scales, jnp.float32), g_idx=jnp.asarray(g_idx),
                      bits=bits, group_size=cfg.group_size, format=cfg.format)


def read_block(ckpt: HFCheckpoint, i: int, cfg: GPTQConfig, dtype: Any = jnp.float32) -> Params:
  """Decoder block ``i`` of a GPTQ folder: PackedWeight kernels where ``<name>.qweight`` exists
  (a sparse block's experts: one per expert, stacked), dense arrays (``dtype``) for everything
  else. Reads only this block's tensors."""
  dense_specs, packed = [], {}
  for path, name, shape in layer_tensor_specs(ckpt.config, i):
    prefix = name[:-len(".weight")]
    if path[-1] == "kernel" and ckpt.has(f"{prefix}.qweight"):
      packed[path] = _read_packed(ckpt, ckpt.resolve(f"{prefix}.qweight")[:-len(".qweight")],
                                  shape, cfg)
    else:
      dense_specs.append((path, name, shape))
  float_experts = []
  for spec in layer_expert_specs(ckpt.config, i):
    prefixes = [n[:-len(".weight")] for n in spec.names]
    if all(ckpt.has(f"{p}.qweight") for p in prefixes):
      packed[spec.path] = stack_weights([
          _read_packed(ckpt, ckpt.resolve(f"{p}.qweight")[:-len(".qweight")], spec.shape, cfg)
          for p in prefixes])
    else:
      float_experts.append(spec)
  block = params_from_tensors(dense_specs, ckpt.get, dtype)
  merge_into(block, experts_from_tensors(float_experts, ckpt.get, ckpt.has, dtype))
  for path, w in packed.items():
    node = block
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = w
  return block


def import_hf(path: str | os.PathLike, dtype: Any = jnp.float32
              ) -> tuple[ModelConfig, Params, GPTQConfig]:
  """Reads a Hugging Face GPTQ folder (``gptq`` v1 or ``gptq_v2``, with or without act-order) ->
  ``(model_config, params, cfg)``; quantized linears are ``PackedWeight`` kernels (scales as
  float32, exactly the stored float16 values), the rest dense ``dtype`` arrays. The params run
  with ``gptq_jax.models.forward``."""
  folder = os.fspath(path)
  ckpt = HFCheckpoint(folder)
  try:
    cfg = read_quantization_config(folder)
    model_config = ckpt.config
    if f"{LM_HEAD}.qweight" in ckpt.tensor_names():  # lm_head=True: its own, packed projection
      model_config = model_config.replace(tie_word_embeddings=False)
      specs = [s for s in nonlayer_tensor_specs(model_config) if s[0][0] != LM_HEAD]
      params = params_from_tensors(specs, ckpt.get, dtype)
      params[LM_HEAD] = {"kernel": _read_packed(
          ckpt, LM_HEAD, (model_config.vocab_size, model_config.hidden_size), cfg)}
    else:
      params = ckpt.nonlayer_params(dtype)
    for i in range(model_config.num_hidden_layers):
      params[f"layers_{i}"] = read_block(ckpt, i, cfg, dtype)
    return model_config, ModelParams(params, model_config), cfg
  finally:
    ckpt.close()

"""compressed-tensors "pack-quantized" folders <-> gptq_jax params (docs/serving.md).

The layout llm-compressor writes for GPTQ W4A16 / W8A16 and vLLM (and SGLang) read with their
WNA16 schemes. For a linear ``<name>`` with ``K`` inputs, ``N`` outputs, ``b`` bits (4 or 8) and
``G`` groups:

- ``<name>.weight_packed`` int32 ``[N, K*b/32]``: the codes packed along the *inputs*, ``32/b``
  per word, value ``j`` of a word at bit ``b*j``. A code is stored unsigned: the signed
  compressed-tensors value plus ``2**(b-1)``, which is exactly the GPTQ code in ``[0, 2**b)``;
- ``<name>.weight_scale`` ``[N, G]`` in the model's float dtype (one scale per output and group);
- ``<name>.weight_shape`` int64 ``[2]`` = ``[N, K]``;
- ``<name>.weight_zero_point`` int32 ``[N*b/32, G]`` (asymmetric only): the zero points packed
  along the *outputs*, stored unsigned like the codes (the GPTQ zero point);
- ``<name>.weight_g_idx`` int32 ``[K]``: older checkpoints with ``actorder: "group"`` only (read,
  never written: compressed-tensors 0.20 and vLLM 0.32 refuse that ordering).

Dequantization is ``scale[n, g] * (code - zero)``, with ``zero = 2**(b-1)`` when symmetric: a
GPTQ weight and its compressed-tensors form dequantize to the same values. ``config.json`` carries
``quantization_config`` with ``quant_method: compressed-tensors``, ``format: pack-quantized``,
``config_groups`` (``targets: ["Linear"]`` for the base scheme, exact module names for modules a
``dynamic`` rule changes) and ``ignore`` (``lm_head`` unless it is quantized, and every module a
``-:`` rule leaves in float). What the layout cannot express is refused up front by
``check_expressible``: 2/3-bit weights, a group size that does not divide an input size, and
act-order with groups out of order (a non-trivial ``g_idx``).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator

import jax.numpy as jnp
import numpy as np

from gptq_jax.config import GPTQConfig
from gptq_jax.core import packing
from gptq_jax.core.weights import PackedWeight, QuantizedWeight
from gptq_jax.interop import hf_gptq
from gptq_jax.models.config import ModelConfig
from gptq_jax.models.hf import (HFCheckpoint, Params, layer_tensor_specs, nonlayer_tensor_specs,
                                params_from_tensors)
from gptq_jax.models.params import ModelParams
from gptq_jax.pipeline.dynamic import LM_HEAD, resolve

CT_METHOD = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
CT_BITS = (4, 8)
LINEAR_TARGET = "Linear"  # the class-name target: every linear layer


# ----- which modules, with which settings -----------------------------------------------------

def modules(model_config: ModelConfig, cfg: GPTQConfig
            ) -> Iterator[tuple[str, int, int, GPTQConfig | None]]:
  """``(name, in_features, out_features, module config or None when left in float)`` of every
  linear the export writes (the block linears, then ``lm_head``)."""
  for i in range(model_config.num_hidden_layers):
    for path, name, shape in layer_tensor_specs(model_config, i):
      if path[-1] == "kernel":
        prefix = name[:-len(".weight")]
        yield prefix, shape[1], shape[0], resolve(cfg, prefix)
  head = resolve(cfg, LM_HEAD) if cfg.lm_head else None
  yield LM_HEAD, model_config.hidden_size, model_config.vocab_size, head


def largest_dividing_group(sizes, at_most: int = 128) -> int:
  """The largest power-of-two group size <= ``at_most`` dividing every input size (-1 if none)."""
  g = at_most
  while g >= 2:
    if all(k % g == 0 for k in sizes):
      return g
    g //= 2
  return -1


def act_order_groups(c: GPTQConfig) -> bool:
  """Whether ``c`` makes groups out of input order (a non-trivial ``g_idx``)."""
  return c.desc_act and not c.static_groups and c.group_size != -1


def check_expressible(model_config: ModelConfig, cfg: GPTQConfig) -> None:
  """Refuse (one line, before any work) what pack-quantized compressed-tensors cannot store."""
  quantized = [(name, k, c) for name, k, _, c in modules(model_config, cfg) if c is not None]
  sizes = sorted({k for _, k, _ in quantized})
  for name, k, c in quantized:
    if c.bits not in CT_BITS:
      raise ValueError(f"--hf-format compressed-tensors stores 4- or 8-bit weights (W4A16 / W8A16 "
                       f"pack-quantized, what vLLM's WNA16 loaders read), but {name} has "
                       f"{c.bits} bits: export with --hf-format gptq")
    if c.group_size != -1 and k % c.group_size:
      raise ValueError(f"--hf-format compressed-tensors needs every input size divisible by the "
                       f"group size, but {name} has {k} inputs and group_size {c.group_size}: "
                       f"use --group-size {largest_dividing_group(sizes)} (the largest dividing "
                       f"every input size {sizes}) or --hf-format gptq")
    if act_order_groups(c):
      raise ValueError(f"--hf-format compressed-tensors cannot store act-order groups ({name}: "
                       "desc_act without static_groups gives a non-trivial g_idx; compressed-"
                       "tensors 0.20 removed actorder='group' and vLLM 0.32 refuses it): quantize "
                       "with --static-groups (act-order, contiguous groups) or use --hf-format gptq")


# ----- config.json ------------------------------------------------------------------------------

def weights_args(c: GPTQConfig) -> dict[str, Any]:
  """compressed-tensors ``QuantizationArgs`` of the weights of a module quantized with ``c``."""
  channel = c.group_size == -1
  return {"num_bits": c.bits, "type": "int", "symmetric": c.sym,
          "strategy": "channel" if channel else "group",
          "group_size": None if channel else c.group_size, "dynamic": False,
          "actorder": "weight" if c.desc_act and not channel else None, "observer": "minmax"}


def _scheme(targets: list[str], c: GPTQConfig) -> dict[str, Any]:
  return {"targets": targets, "weights": weights_args(c), "input_activations": None,
          "output_activations": None, "format": PACK_QUANTIZED}


def ct_quantization_config(model_config: ModelConfig, cfg: GPTQConfig,
                           calibration_source: dict | None = None) -> dict[str, Any]:
  """The ``quantization_config`` of a compressed-tensors export of ``cfg`` (see the module doc);
  the GPTQ config it came from is kept under ``gptq_jax`` (loaders ignore it)."""
  base = weights_args(cfg)
  extra: dict[str, list[str]] = {}  # scheme (JSON) -> exact module names
  ignore = []
  for name, _, _, c in modules(model_config, cfg):
    if c is None:
      ignore.append(name)
    elif weights_args(c) != base:
      extra.setdefault(json.dumps(weights_args(c), sort_keys=True), []).append(name)
  # Modules on other schemes first: readers that take the first group whose targets match (as
  # transformers' loader does) then agree with compressed-tensors' precedence (exact name first).
  groups = {f"group_{k}": {**_scheme(names, cfg), "weights": json.loads(args)}
            for k, (args, names) in enumerate(extra.items())}
  groups[f"group_{len(extra)}"] = _scheme([LINEAR_TARGET], cfg)
  return {"quant_method": CT_METHOD, "format": PACK_QUANTIZED, "quantization_status": "compressed",
          "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None,
          "sparsity_config": {}, "transform_config": {}, "global_compression_ratio": None,
          "gptq_jax": {"gptq_config": hf_gptq.quantization_config(
              cfg, calibration_source=calibration_source)}}


def write_configs(folder: str, model_config: ModelConfig, cfg: GPTQConfig, dtype: Any,
                  tokenizer: Any = None, *, calibration_source: dict | None = None) -> None:
  """config.json with the compressed-tensors quantization_config, and the tokenizer files."""
  qc = ct_quantization_config(model_config, cfg, calibration_source)
  config = dict(model_config.to_hf_dict(), torch_dtype=hf_gptq._float_dtype(dtype).name,
                quantization_config=qc)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(folder)


# ----- params -> tensors ------------------------------------------------------------------------

def ct_linear(w: PackedWeight | QuantizedWeight, cfg: GPTQConfig | None, name: str,
              hf_shape: tuple[int, int], dtype: np.dtype) -> dict[str, np.ndarray]:
  """The compressed-tensors tensors of one quantized linear (the ``linear`` hook of
  ``hf_gptq._tensors``)."""
  c = resolve(cfg, name) if cfg is not None else None
  if c is None:
    raise ValueError(f"{name} is quantized but the config leaves it in float")
  q = w.unpack() if isinstance(w, PackedWeight) else w
  n, k = hf_shape
  if q.shape != (k, n):
    raise ValueError(f"{name}: quantized weight is [in, out] = {list(q.shape)}, but the model "
                     f"config implies {[k, n]}")
  g_idx = np.asarray(q.g_idx)
  group = k if c.group_size == -1 else c.group_size
  if not np.array_equal(g_idx, np.arange(k) // group):
    raise ValueError(f"{name}: its g_idx is not [i // {group}] (act-order groups), which "
                     "compressed-tensors cannot store: export with --hf-format gptq")
  zeros = np.asarray(q.zeros)
  mid = 2 ** (q.bits - 1)
  if c.sym and not np.all(zeros == mid):
    raise ValueError(f"{name}: symmetric config but zero points other than {mid}: the weight "
                     "is asymmetric (quantize with --no-sym)")
  scales = np.asarray(q.scales, np.float32).T.astype(dtype)
  if not np.all(np.isfinite(scales.astype(np.float32))):
    raise ValueError(f"{name}: scales do not fit {dtype.name}: export with --dtype float32")
  out = {f"{name}.weight_packed": np.asarray(packing.pack_cols(jnp.asarray(q.codes).T, q.bits)),
         f"{name}.weight_scale": np.ascontiguousarray(scales),
         f"{name}.weight_shape": np.array([n, k], np.int64)}
  if not c.sym:
    out[f"{name}.weight_zero_point"] = np.asarray(packing.pack_rows(jnp.asarray(zeros).T, q.bits))
  return out


# ----- reading ----------------------------------------------------------------------------------

def read_ct_config(folder: str) -> dict[str, Any] | None:
  """``quantization_config`` of a compressed-tensors folder, or None for any other folder."""
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    qc = json.load(f).get("quantization_config")
  if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == CT_METHOD:
    return qc
  return None


def _matches(name: str, target: str) -> bool:
  if target.startswith("re:"):
    return re.match(target[3:], name) is not None
  return target == name


def module_weights(qc: dict[str, Any], name: str) -> dict[str, Any] | None:
  """The weight ``QuantizationArgs`` dict of module ``name``, or None (not quantized): ``ignore``
  first, then the targets in compressed-tensors' order (exact name, regex, class ``Linear``)."""
  if any(_matches(name, t) for t in qc.get("ignore") or []):
    return None
  found = {}
  for group in (qc.get("config_groups") or {}).values():
    for t in group.get("targets", []):
      if t.startswith("re:") or t == name or t == LINEAR_TARGET:
        if t == LINEAR_TARGET or _matches(name, t):
          rank = 2 if t == LINEAR_TARGET else (1 if t.startswith("re:") else 0)
          found.setdefault(rank, group.get("weights"))
  return found[min(found)] if found else None


def _check_supported(name: str, args: dict[str, Any], fmt: str) -> None:
  if fmt != PACK_QUANTIZED:
    raise ValueError(f"{name}: compressed-tensors format {fmt!r} is not supported: only "
                     f"{PACK_QUANTIZED!r} (integer weights, float activations)")
  if args.get("type", "int") != "int" or args.get("strategy") not in ("group", "channel"):
    raise ValueError(f"{name}: weights {args.get('type')}/{args.get('strategy')} are not "
                     "supported: only int weights with group or channel strategy")
  packing.run_shape(int(args["num_bits"]))  # names an unsupported bit width


def read_linear(ckpt: HFCheckpoint, name: str, hf_shape: tuple[int, int], args: dict[str, Any]
                ) -> QuantizedWeight:
  """One linear of a compressed-tensors folder as a ``QuantizedWeight`` (codes, float32 scales
  holding exactly the stored values, integer zero points, g_idx)."""
  n, k = hf_shape
  bits = int(args["num_bits"])
  group = -1 if args.get("strategy") == "channel" else int(args["group_size"])
  groups = 1 if group == -1 else -(-k // group)
  codes = packing.unpack_rows(jnp.asarray(ckpt.get(f"{name}.weight_packed")).T, bits)[:k]
  scales = np.asarray(ckpt.get(f"{name}.weight_scale", (n, groups)), np.float32).T
  if args.get("symmetric", True):
    zeros = np.full((groups, n), 2 ** (bits - 1), np.int32)
  else:
    zp = np.asarray(ckpt.get(f"{name}.weight_zero_point"))
    if zp.shape == (n, groups):  # older layouts: unpacked signed int8 zero points
      zeros = (zp.astype(np.int32) + 2 ** (bits - 1)).T
    else:
      zeros = np.asarray(packing.unpack_rows(jnp.asarray(zp), bits))[:n].T
  names = set(ckpt.tensor_names())
  g_idx = (np.asarray(ckpt.get(f"{name}.weight_g_idx", (k,)), np.int32)
           if f"{name}.weight_g_idx" in names else np.arange(k, dtype=np.int32) // (
               k if group == -1 else group))
  if codes.shape != (k, n):
    raise ValueError(f"{name}.weight_packed holds {list(codes.shape)} codes, expected [{k}, {n}]")
  return QuantizedWeight(codes=jnp.asarray(codes, jnp.uint8), scales=jnp.asarray(scales),
                         zeros=jnp.asarray(zeros, jnp.int32), g_idx=jnp.asarray(g_idx),
                         bits=bits, group_size=group)


def gptq_config(qc: dict[str, Any], model_config: ModelConfig) -> GPTQConfig:
  """The GPTQConfig of a compressed-tensors folder: the one gptq_jax recorded, else derived from
  the base scheme (modules on other schemes become exact-name ``dynamic`` rules)."""
  recorded = (qc.get("gptq_jax") or {}).get("gptq_config")
  if recorded:
    return hf_gptq.config_from_dict(recorded)
  groups = list((qc.get("config_groups") or {}).values())
  if not groups:
    raise ValueError("compressed-tensors folder without config_groups: nothing is quantized")
  base = next((g for g in groups if LINEAR_TARGET in g.get("targets", [])), groups[0])["weights"]

  def settings(args):
    group = -1 if args.get("strategy") == "channel" else int(args["group_size"])
    order = args.get("actorder")
    return {"bits": int(args["num_bits"]), "group_size": group, "sym": bool(args.get("symmetric")),
            "desc_act": order is not None and group != -1}

  b = settings(base)
  static = base.get("actorder") in ("weight", "static")
  dynamic = {}
  probe = GPTQConfig(b["bits"], group_size=b["group_size"])
  for name, _, _, _ in modules(model_config, probe.replace(lm_head=True)):
    args = module_weights(qc, name)
    if args is None and name != LM_HEAD:
      dynamic[f"-:{re.escape(name)}$"] = {}
    elif args is not None and settings(args) != b:
      dynamic[f"+:{re.escape(name)}$"] = settings(args)
  lm_head = module_weights(qc, LM_HEAD) is not None
  return GPTQConfig(b["bits"], group_size=b["group_size"], sym=b["sym"], desc_act=b["desc_act"],
                    static_groups=static and b["group_size"] != -1, act_group_aware=False,
                    format="gptq" if b["sym"] else "gptq_v2", dynamic=dynamic or None,
                    lm_head=lm_head)


def import_ct(path: str | os.PathLike, dtype: Any = jnp.float32
              ) -> tuple[ModelConfig, ModelParams, GPTQConfig]:
  """Reads a compressed-tensors pack-quantized folder (llm-compressor's GPTQ output or ours) ->
  ``(model_config, params, cfg)``; quantized linears are ``PackedWeight`` kernels (GPTQ layout,
  ``cfg.format``; scales are exactly the stored values), the rest dense ``dtype`` arrays."""
  folder = os.fspath(path)
  qc = read_ct_config(folder)
  if qc is None:
    raise ValueError(f"{folder!r} is not a compressed-tensors folder (no quantization_config with "
                     f"quant_method {CT_METHOD!r})")
  ckpt = HFCheckpoint(folder)
  try:
    model_config = ckpt.config
    names = set(ckpt.tensor_names())
    if f"{LM_HEAD}.weight_packed" in names:
      model_config = model_config.replace(tie_word_embeddings=False)
    cfg = gptq_config(qc, model_config)

    def packed(name, shape):
      args = module_weights(qc, name)
      _check_supported(name, args, qc.get("format", PACK_QUANTIZED))
      fmt = cfg.format if args.get("symmetric", True) else "gptq_v2"
      return read_linear(ckpt, name, shape, args).pack(fmt)

    def read(specs):
      dense = [s for s in specs if not (s[0][-1] == "kernel"
                                        and f"{s[1][:-len('.weight')]}.weight_packed" in names)]
      tree = params_from_tensors(dense, ckpt.get, dtype)
      for path, name, shape in specs:
        if (path, name, shape) not in dense:
          node = tree
          for key in path[:-1]:
            node = node.setdefault(key, {})
          node[path[-1]] = packed(name[:-len(".weight")], shape)
      return tree

    params = read(list(nonlayer_tensor_specs(model_config)))
    for i in range(model_config.num_hidden_layers):
      params[f"layers_{i}"] = read(list(layer_tensor_specs(model_config, i)))
    return model_config, ModelParams(params, model_config), cfg
  finally:
    ckpt.close()

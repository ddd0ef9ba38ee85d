"""compressed-tensors pack-quantized export and import against the layout's own code.

The oracle is the ``compressed-tensors`` package (0.20, the code llm-compressor saves with and
transformers loads with): exports load through ``transformers.AutoModelForCausalLM.from_pretrained``
with logits equal to ours, and a folder its own compressor writes from known weights imports with
identical dequantized weights. Under CI=true a missing package fails these tests.
"""

import json
import os

import numpy as np
import pytest

import gptq_jax as gj
from gptq_jax.interop import formats
from gptq_jax.interop.compressed_tensors import import_ct
from gptq_jax.models import forward
from gptq_jax.pipeline.rtn import rtn_model
from tests.interop.helpers import oracle_unavailable

CT = "compressed-tensors"


def _oracle():
  try:
    import compressed_tensors  # noqa: F401,PLC0415
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
  except ImportError as e:
    oracle_unavailable(f"compressed-tensors / transformers not importable: {e}")
  return torch, transformers


def _load(folder, dequantize: bool):
  """transformers' model of a folder (``dequantize=True``: decompressed at load; see CONFIGS)."""
  torch, transformers = _oracle()
  kw = ({"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)}
        if dequantize else {})
  return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)


CONFIGS = {  # name: (config, load with dequantize=True)
    # One folder, several config groups, loaded as compressed modules (decompressed by
    # compressed-tensors on the first forward): 4-bit symmetric act-order (static groups) as the
    # base, 8-bit groups, 8-bit channelwise, a module left in float, and lm_head.
    "mixed_sym": (gj.GPTQConfig(
        4, group_size=32, desc_act=True, static_groups=True, act_group_aware=False, lm_head=True,
        dynamic={r"+:model\.layers\.1\.mlp\.down_proj": {"bits": 8},
                 r"+:model\.layers\.1\.self_attn\.[qkv]_proj": {"bits": 8, "group_size": -1},
                 r"-:model\.layers\.0\.self_attn\.o_proj": {}}), False),
    # Asymmetric folders load with dequantize=True: transformers 5.25 + compressed-tensors 0.20
    # build compressed modules with unpacked zero points ([N, G]) and refuse the packed ones
    # compressed-tensors itself writes ([N*b/32, G]); that path reads one scheme per folder.
    "w4_asym_g32": (gj.GPTQConfig(4, group_size=32, sym=False, format="gptq_v2",
                                  act_group_aware=False), True),
    "w8_asym_channel": (gj.GPTQConfig(8, group_size=-1, sym=False, format="gptq_v2"), True),
}


def _dense(params):
  """Kernels dequantized (float32): one compiled forward serves every configuration."""
  import jax  # noqa: PLC0415

  is_packed = lambda x: isinstance(x, gj.PackedWeight)  # noqa: E731
  return jax.tree.map(lambda x: x.dequantize() if is_packed(x) else x, params, is_leaf=is_packed)


def _quantized(tiny_llama, cfg):
  """RTN (the layout, not GPTQ, is under test) of every linear with its own settings (``dynamic``
  rules), lm_head too when ``cfg.lm_head``; modules a ``-:`` rule skips stay float."""
  from gptq_jax.core.gptq import rtn_quantize  # noqa: PLC0415
  from gptq_jax.interop.compressed_tensors import modules  # noqa: PLC0415

  model_config, params, _ = tiny_llama
  q = rtn_model(params, cfg.replace(dynamic=None, lm_head=False), model_config=model_config)
  q = {**q, "lm_head": dict(params["lm_head"])}
  for name, _, _, c in modules(model_config, cfg.replace(lm_head=True)):
    node = q["lm_head"] if name == "lm_head" else q[f"layers_{name.split('.')[2]}"][
        name.split(".")[3]][name.split(".")[4]]
    src = params["lm_head"] if name == "lm_head" else params[f"layers_{name.split('.')[2]}"][
        name.split(".")[3]][name.split(".")[4]]
    if c is None or (name == "lm_head" and not cfg.lm_head):
      node["kernel"] = src["kernel"]
    else:
      node["kernel"] = rtn_quantize(src["kernel"], c).pack(c.format)
  return q


@pytest.mark.parametrize("name", list(CONFIGS))
def test_exports_load_in_transformers_with_our_logits(tiny_llama, tmp_path, name):
  cfg, dequantize = CONFIGS[name]
  model_config, _, ids = tiny_llama
  qparams = _quantized(tiny_llama, cfg)
  # float32 scales: compressed-tensors dequantizes in the scale dtype, so float16 scales would
  # round (q - z) * s to float16 where we keep float32; float32 makes both exact.
  folder = formats.export(str(tmp_path / name), qparams, model_config, cfg, hf_format=CT,
                          dtype="float32")
  with open(os.path.join(folder, "config.json")) as f:
    qc = json.load(f)["quantization_config"]
  assert (qc["quant_method"], qc["format"]) == ("compressed-tensors", "pack-quantized")
  base = list(qc["config_groups"].values())[-1]  # the others come first
  assert base["targets"] == ["Linear"] and base["weights"]["num_bits"] == cfg.bits
  assert base["weights"]["actorder"] == ("weight" if cfg.desc_act else None)
  assert ("lm_head" in qc["ignore"]) == (not cfg.lm_head)
  if cfg.dynamic:
    assert qc["ignore"] == ["model.layers.0.self_attn.o_proj"]
    assert sorted(len(g["targets"]) for g in qc["config_groups"].values()) == [1, 1, 3]
  read_config, params, read_cfg = import_ct(folder)
  assert read_cfg == cfg
  want, got = _dense(qparams), _dense(params)  # the export loses nothing
  for a, b in zip(jax_leaves(want), jax_leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ours = np.asarray(forward(got, read_config, ids[:2]))
  torch, _ = _oracle()
  model = _load(folder, dequantize)
  with torch.no_grad():
    theirs = model(torch.tensor(ids[:2].astype(np.int64))).logits.numpy()
  err, scale = np.abs(ours - theirs).max(), np.abs(theirs).max()
  assert err <= 2e-5 * scale, f"{name}: max |diff| {err} (logits up to {scale})"


def jax_leaves(tree):
  import jax  # noqa: PLC0415

  return jax.tree_util.tree_leaves(tree)


def test_layout_matches_compressed_tensors_packing(tiny_llama, tmp_path):
  """Tensor names, dtypes and shapes, and the packed words, as the package's pack_to_int32."""
  torch, _ = _oracle()
  from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: PLC0415

  cfg = CONFIGS["w4_asym_g32"][0]
  model_config, _, _ = tiny_llama
  qparams = _quantized(tiny_llama, cfg)
  folder = formats.export(str(tmp_path / "ct"), qparams, model_config, cfg, hf_format=CT)
  from gptq_jax.models.safetensors_io import SafetensorsFile  # noqa: PLC0415

  f = SafetensorsFile(os.path.join(folder, "model.safetensors"))
  name = "model.layers.0.mlp.down_proj"  # [N, K] = [64, 160]
  q = qparams["layers_0"]["mlp"]["down_proj"]["kernel"].unpack()
  codes = torch.tensor(np.asarray(q.codes, np.int32).T - 8, dtype=torch.int8)  # signed, [N, K]
  zeros = torch.tensor(np.asarray(q.zeros, np.int32).T - 8, dtype=torch.int8)  # [N, G]
  np.testing.assert_array_equal(f.get(f"{name}.weight_packed"), pack_to_int32(codes, 4).numpy())
  np.testing.assert_array_equal(f.get(f"{name}.weight_zero_point"),
                                pack_to_int32(zeros, 4, packed_dim=0).numpy())
  assert f.get(f"{name}.weight_scale").dtype == np.float16
  assert f.get(f"{name}.weight_scale").shape == (64, 5)
  np.testing.assert_array_equal(f.get(f"{name}.weight_shape"), np.array([64, 160], np.int64))
  assert f"{name}.weight_g_idx" not in f.keys() and f"{name}.qweight" not in f.keys()


@pytest.mark.parametrize("change,message", [
    (dict(bits=3), "stores 4- or 8-bit weights.*has 3 bits"),
    (dict(group_size=64), "160 inputs and group_size 64: use --group-size 32"),
    (dict(desc_act=True), "cannot store act-order groups.*--static-groups"),
])
def test_refuses_what_the_layout_cannot_store(tiny_llama, tmp_path, change, message):
  model_config, params, _ = tiny_llama
  cfg = gj.GPTQConfig(4, group_size=32, act_group_aware=False).replace(**change)
  with pytest.raises(ValueError, match=message) as e:
    formats.export(str(tmp_path / "x"), params, model_config, cfg, hf_format=CT)
  assert "\n" not in str(e.value)
  assert not os.listdir(tmp_path)  # refused before anything was written


def _compressor_folder(folder, sym: bool, seed: int):
  """A folder written by compressed-tensors' own compressor (llm-compressor's save path) from
  known weights: random codes, zero points and scales; returns {module: dequantized [out, in]}."""
  torch, _ = _oracle()
  from compressed_tensors.compressors import ModelCompressor  # noqa: PLC0415
  from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,  # noqa: PLC0415
                                               QuantizationScheme, apply_quantization_config)

  from gptq_jax.models.testing import tiny_hf_model  # noqa: PLC0415

  model = tiny_hf_model(seed, "llama")
  args = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group", group_size=32)
  qc = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"],
                                                                       weights=args)},
                          ignore=["lm_head"], format="pack-quantized")
  apply_quantization_config(model, qc)
  rng, known = np.random.default_rng(seed), {}
  for name, mod in model.named_modules():
    if not hasattr(mod, "weight_scale"):
      continue
    n, k = mod.weight.shape
    scale = rng.uniform(0.01, 0.05, (n, k // 32)).astype(np.float32)
    zp = np.zeros((n, k // 32), np.int64) if sym else rng.integers(-8, 8, (n, k // 32))
    q = rng.integers(-8, 8, (n, k))
    w = (q - np.repeat(zp, 32, 1)) * np.repeat(scale, 32, 1)
    mod.weight.data = torch.tensor(w, dtype=torch.float32)
    mod.weight_scale.data = torch.tensor(scale)
    if not sym:
      mod.weight_zero_point.data = torch.tensor(zp, dtype=mod.weight_zero_point.dtype)
    known[name] = w.astype(np.float32)
  compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
  compressor.compress_model(model)
  model.save_pretrained(folder)
  compressor.update_config(folder)
  return known


@pytest.mark.parametrize("sym", [True, False])
def test_imports_what_compressed_tensors_writes(tmp_path, sym):
  folder = str(tmp_path / "llm_compressor_layout")
  known = _compressor_folder(folder, sym, seed=3)
  from gptq_jax.loading import HF_CT, open_model  # noqa: PLC0415

  loaded = open_model(folder)  # detected as compressed-tensors from its config.json
  params, cfg = loaded.params, loaded.quant_config
  assert loaded.kind == HF_CT
  assert (cfg.bits, cfg.group_size, cfg.sym) == (4, 32, sym)
  for name, want in known.items():
    i, group, proj = name.split(".")[2:]
    w = params[f"layers_{i}"][group][proj]["kernel"]
    assert isinstance(w, gj.PackedWeight), name
    np.testing.assert_array_equal(np.asarray(w.dequantize()).T, want, err_msg=name)
  # the package's own decompression agrees (the weights transformers computes with)
  model = _load(folder, dequantize=True)
  for name, want in known.items():
    np.testing.assert_array_equal(model.get_submodule(name).weight.detach().numpy(), want,
                                  err_msg=name)

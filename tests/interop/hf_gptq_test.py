"""export_hf / import_hf: the on-disk layout of docs/format.md, bit-exact round trips, errors."""

import json
import os

import numpy as np
import pytest

from gptq_jax.core.weights import PackedWeight
from gptq_jax.interop import FolderWriter, block_tensors, export_hf, import_hf, nonlayer_tensors
from gptq_jax.models import forward, save_hf_folder
from gptq_jax.models.safetensors_io import SafetensorsFile, save_safetensors
from gptq_jax.pipeline import dense_block
from tests.interop.helpers import tiny_tokenizer

QKEYS = ("bits", "group_size", "desc_act", "sym", "true_sequential", "damp_percent",
         "static_groups", "quant_method", "checkpoint_format", "act_group_aware", "format",
         "dataset", "meta")


def _tensors(folder):
  f = SafetensorsFile(os.path.join(folder, "model.safetensors"))
  return {name: np.array(f.get(name)) for name in f.keys()}


def _kernels(params, n_layers):
  for i in range(n_layers):
    for group, projs in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                         ("mlp", ("gate_proj", "up_proj", "down_proj"))):
      for proj in projs:
        yield f"model.layers.{i}.{group}.{proj}", params[f"layers_{i}"][group][proj]["kernel"]


@pytest.mark.parametrize("bits,desc_act,fmt", [(4, False, "gptq"), (3, True, "gptq_v2"),
                                               (4, True, "gptq_v2")])
def test_round_trip_is_bit_exact(tiny_llama, quantized, tmp_path, bits, desc_act, fmt):
  cfg, _, ids = tiny_llama
  qcfg, qparams = quantized(bits, desc_act)
  qcfg = qcfg.replace(format=fmt)
  first, second = str(tmp_path / "a"), str(tmp_path / "b")
  export_hf(first, qparams, cfg, qcfg)
  model_config, params, read_cfg = import_hf(first)
  assert model_config == cfg and read_cfg == qcfg
  for name, w in _kernels(params, cfg.num_hidden_layers):
    i, group, proj = name.split(".")[2:]
    orig = qparams[f"layers_{i}"][group][proj]["kernel"].unpack()
    assert isinstance(w, PackedWeight) and (w.bits, w.group_size, w.format) == (bits, 32, fmt)
    back = w.unpack()
    np.testing.assert_array_equal(np.asarray(back.codes), np.asarray(orig.codes), err_msg=name)
    np.testing.assert_array_equal(np.asarray(back.zeros), np.asarray(orig.zeros), err_msg=name)
    np.testing.assert_array_equal(np.asarray(back.g_idx), np.asarray(orig.g_idx), err_msg=name)
    np.testing.assert_array_equal(  # scales are float16 on disk
        np.asarray(back.scales), np.asarray(orig.scales).astype(np.float16).astype(np.float32))
  np.testing.assert_array_equal(
      np.asarray(params["embed_tokens"]["embedding"]),
      np.asarray(qparams["embed_tokens"]["embedding"]).astype(np.float16).astype(np.float32))
  # Exporting what was imported writes the same bytes: nothing is lost or reinterpreted.
  export_hf(second, params, model_config, read_cfg)
  a, b = _tensors(first), _tensors(second)
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
  if bits == 4:
    return  # running packed kernels: once here (3-bit act-order), and in gptqmodel_test.py
  # The imported model runs with its packed kernels as its dequantized copy does.
  dense = {k: dense_block(v) if k.startswith("layers_") else v for k, v in params.items()}
  np.testing.assert_allclose(np.asarray(forward(params, model_config, ids[:2])),
                             np.asarray(forward(dense, model_config, ids[:2])), rtol=1e-4,
                             atol=1e-4)


def test_folder_layout_matches_the_reference(tiny_llama, quantized, tmp_path):
  """Names, dtypes and shapes of docs/format.md; v1 sym 4-bit zeros are 0x77777777; configs."""
  cfg, _, _ = tiny_llama
  qcfg, qparams = quantized(4, False)
  folder = str(tmp_path / "hf")
  export_hf(folder, qparams, cfg, qcfg, tokenizer=tiny_tokenizer(cfg.vocab_size))
  t = _tensors(folder)
  shapes = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
            "gate_proj": (64, 160), "up_proj": (64, 160), "down_proj": (160, 64)}
  for name, _ in _kernels(qparams, cfg.num_hidden_layers):
    k, n = shapes[name.split(".")[-1]]
    assert f"{name}.weight" not in t
    assert (t[f"{name}.qweight"].dtype, t[f"{name}.qweight"].shape) == (np.int32, (k * 4 // 32, n))
    assert (t[f"{name}.qzeros"].dtype, t[f"{name}.qzeros"].shape) == (np.int32, (k // 32, n // 8))
    assert (t[f"{name}.scales"].dtype, t[f"{name}.scales"].shape) == (np.float16, (k // 32, n))
    assert (t[f"{name}.g_idx"].dtype, t[f"{name}.g_idx"].shape) == (np.int32, (k,))
    np.testing.assert_array_equal(t[f"{name}.g_idx"], np.arange(k) // 32)
    assert np.all(t[f"{name}.qzeros"].view(np.uint32) == 0x77777777)
  assert t["model.embed_tokens.weight"].dtype == np.float16
  assert t["lm_head.weight"].shape == (cfg.vocab_size, cfg.hidden_size)
  assert t["model.layers.1.post_attention_layernorm.weight"].shape == (cfg.hidden_size,)
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(folder, "quantize_config.json")) as f:
    assert json.load(f) == config["quantization_config"]
  qc = config["quantization_config"]
  assert set(QKEYS) <= set(qc)
  assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["checkpoint_format"]) == (
      "gptq", 4, 32, "gptq")
  assert config["torch_dtype"] == "float16" and config["model_type"] == "llama"
  assert os.path.isfile(os.path.join(folder, "tokenizer.json"))


def test_export_refuses_to_overwrite_and_cleans_up(tiny_llama, quantized, tmp_path):
  cfg, _, _ = tiny_llama
  qcfg, qparams = quantized(4, False)
  folder = tmp_path / "hf"
  folder.mkdir()
  with pytest.raises(FileExistsError, match="already exists"):
    export_hf(str(folder), qparams, cfg, qcfg)
  bad = {**qparams, "layers_1": {**qparams["layers_1"], "mlp": {}}}
  with pytest.raises(KeyError):
    export_hf(str(tmp_path / "broken"), bad, cfg, qcfg)
  assert sorted(os.listdir(tmp_path)) == ["hf"]  # no half-written folder left behind
  with pytest.raises(ValueError, match="dtype"):
    export_hf(str(tmp_path / "x"), qparams, cfg, qcfg, dtype="int8")


def test_sharded_folder_without_g_idx_imports(tiny_llama, quantized, tmp_path):
  """Several shards plus an index (as large checkpoints are written), and old files lacking
  g_idx (the trivial grouping is assumed)."""
  cfg, _, _ = tiny_llama
  qcfg, qparams = quantized(4, False)
  writer = FolderWriter(str(tmp_path / "sharded"), cfg, qcfg)
  writer.add(nonlayer_tensors(cfg, qparams))
  for i in range(cfg.num_hidden_layers):
    tensors = block_tensors(cfg, i, qparams[f"layers_{i}"], qcfg)
    writer.add({k: v for k, v in tensors.items() if not k.endswith(".g_idx")})
  folder = writer.finish()
  assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
  _, params, _ = import_hf(folder)
  for name, w in _kernels(params, cfg.num_hidden_layers):
    i, group, proj = name.split(".")[2:]
    orig = qparams[f"layers_{i}"][group][proj]["kernel"]
    np.testing.assert_array_equal(np.asarray(w.g_idx), np.asarray(orig.g_idx))
    np.testing.assert_array_equal(np.asarray(w.qweight), np.asarray(orig.qweight))


def test_import_errors_name_the_problem(tiny_llama, quantized, tmp_path):
  cfg, params, _ = tiny_llama
  save_hf_folder(str(tmp_path / "float"), cfg, params)
  with pytest.raises(ValueError, match="not a GPTQ folder"):
    import_hf(str(tmp_path / "float"))
  qcfg, qparams = quantized(4, False)
  folder = str(tmp_path / "hf")
  export_hf(folder, qparams, cfg, qcfg)
  path = os.path.join(folder, "model.safetensors")
  tensors = _tensors(folder)
  tensors["model.layers.0.mlp.up_proj.qweight"] = tensors["model.layers.0.mlp.up_proj.qweight"][:, :8]
  save_safetensors(path, tensors)
  with pytest.raises(ValueError, match="up_proj.qweight has shape"):
    import_hf(folder)

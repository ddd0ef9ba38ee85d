"""Hugging Face GPTQ export / import of mixtures of experts, against transformers and GPTQModel 7.7
(one oracle process per mode, tests/interop/gptqmodel_oracle.py, in .venv-gptqmodel).

What the loaders expect (read from transformers 5.25, Optimum 2.3, GPTQModel 7.7 and its defuser):
- Each expert is its own GPTQ linear, named as in transformers 5's modules with one module per
  expert: `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.{qweight,qzeros,scales,g_idx}` —
  Mixtral too (GPTQModel asks for `mlp.experts.{e}.gate_proj.qweight`; the float files keep
  `block_sparse_moe.experts.{e}.w1`). The router `mlp.gate.weight` and Qwen2-MoE's
  `mlp.shared_expert_gate.weight` are float; `modules_in_block_to_quantize` in the
  quantization_config names the quantized linears, else Optimum would expect the shared-expert
  gate (an nn.Linear) packed too.
- transformers 5.25 alone cannot run them (experts are one fused parameter; Optimum replaces only
  nn.Linear): the oracle's from_pretrained swaps in GPTQModel's defused blocks first (see there).
- GPTQModel 7.7 does not handle Qwen3-MoE's dense-only layers (`mlp_only_layers`: it leaves their
  MLP unquantized and random at load), so its checks use a Qwen3-MoE without them.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import gptq_jax as gj
from gptq_jax import checkpoint
from gptq_jax.core.weights import PackedWeight
from gptq_jax.interop import export_hf, import_hf
from gptq_jax.models import forward
from gptq_jax.models.safetensors_io import SafetensorsFile
from gptq_jax.models.testing import tiny_pair, torch_logits
from gptq_jax.pipeline import rtn_model
from tests.interop.helpers import both_logits, run_oracle, tiny_tokenizer

GROUP = 32
EVAL_IDS = np.random.default_rng(98).integers(3, 256, (2, 24)).astype(np.int32)
# qwen2_moe's shared expert 64 wide: GPTQModel's torch kernel wants whole groups
OVERRIDES = {"qwen3_moe": {}, "qwen2_moe": dict(shared_expert_intermediate_size=64),
             "mixtral": {}}
_forward = jax.jit(forward, static_argnums=1)


def _logits(params, model_config):
  return np.asarray(_forward(jax.tree.map(np.asarray, params), model_config, EVAL_IDS))


def _tokenizer():
  tok = tiny_tokenizer(256)
  tok.pad_token = "<0>"
  return tok


def _names(folder):
  return set(SafetensorsFile(os.path.join(folder, "model.safetensors")).keys())


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  """Per family: (hf model, config, quantized params, GPTQConfig, exported folder). Qwen2-MoE by
  GPTQ (act-order, v1), the others by round-to-nearest (v2 for Mixtral): the format is the test."""
  out = {}
  ids = np.random.default_rng(5).integers(3, 256, (8, 32)).astype(np.int32)
  for family, fmt in (("qwen3_moe", "gptq"), ("qwen2_moe", "gptq"), ("mixtral", "gptq_v2")):
    hf, cfg, params = tiny_pair(family, seed=7, **OVERRIDES[family])
    qcfg = gj.GPTQConfig(4, group_size=GROUP, format=fmt, desc_act=family == "qwen2_moe",
                         act_group_aware=False)
    if family == "qwen2_moe":
      q = gj.quantize(params, ids, qcfg, mesh=None, progress=False)
    else:
      q = rtn_model(params, qcfg)
    folder = str(tmp_path_factory.mktemp("moe") / family)
    export_hf(folder, q, cfg, qcfg, tokenizer=_tokenizer())
    out[family] = (hf, cfg, q, qcfg, folder)
  return out


def test_export_names_and_import_bit_for_bit(exports):
  """One GPTQ linear per expert under transformers 5's module names, router and shared-expert
  gate float, modules_in_block_to_quantize; importing gives back the same codes and configs."""
  for family, (hf, cfg, q, qcfg, folder) in exports.items():
    names = _names(folder)
    for i in range(cfg.num_hidden_layers):
      sparse = cfg.sparse_layer(i)
      for e in range(cfg.num_experts if sparse else 0):
        for proj in ("gate_proj", "up_proj", "down_proj"):
          for part in ("qweight", "qzeros", "scales", "g_idx"):
            assert f"model.layers.{i}.mlp.experts.{e}.{proj}.{part}" in names, (family, i, e)
      assert (f"model.layers.{i}.mlp.gate.weight" in names) == sparse, family
    assert not any("block_sparse_moe" in n or n.endswith(("gate.qweight", "_gate.qweight"))
                   for n in names), family
    qc = json.load(open(os.path.join(folder, "config.json")))["quantization_config"]
    flat = sum(qc["modules_in_block_to_quantize"], [])
    assert "mlp.experts.3.down_proj" in flat and "self_attn.q_proj" in flat
    assert "mlp.gate" not in flat and "mlp.shared_expert_gate" not in flat
    model_config, params, read_cfg = import_hf(folder)
    assert model_config == cfg and (read_cfg.format, read_cfg.desc_act) == (qcfg.format,
                                                                            qcfg.desc_act)
    def same(a, b):
      if isinstance(b, PackedWeight):
        for f in ("qweight", "qzeros", "g_idx"):
          np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)))
        np.testing.assert_array_equal(np.asarray(a.scales),
                                      np.asarray(b.scales).astype(np.float16).astype(np.float32))
      else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(np.float16))
    is_packed = lambda x: isinstance(x, PackedWeight)  # noqa: E731
    jax.tree.map(same, dict(params), dict(q), is_leaf=is_packed)


def test_transformers_and_gptqmodel_run_the_exports_with_our_logits(exports, tmp_path):
  """transformers' from_pretrained (experts defused, see the oracle) on the three exports and
  GPTQModel.load on those it handles give our logits on the imported params."""
  folders = {f: e[4] for f, e in exports.items()}
  ours = {}
  for family, folder in folders.items():
    model_config, params, _ = import_hf(folder)
    ours[family] = _logits(params, model_config)
  gptqmodel_ok = ("qwen2_moe", "mixtral")  # not Qwen3-MoE's dense-only layer (module docstring)
  by_gptqmodel, by_transformers = both_logits([folders[f] for f in gptqmodel_ok],
                                              list(folders.values()), EVAL_IDS, str(tmp_path))
  checks = [("from_pretrained", list(folders), by_transformers),
            ("GPTQModel.load", list(gptqmodel_ok), by_gptqmodel)]
  for loader, families, theirs in checks:
    for family, b in zip(families, theirs, strict=True):
      a = ours[family]
      scale, err = np.abs(b).max(), np.abs(a - b).max()
      assert err <= 1e-4 * scale and scale > 1.0, f"{loader} {family}: |diff| {err} of {scale}"


def test_gptqmodel_quantized_qwen3_moe_imports_with_identical_weights(tmp_path):
  """GPTQModel 7.7 quantizes a tiny Qwen3-MoE (4-bit, act-order, v1); our import gives exactly
  its dequantized experts and attention, the tensor names of our own export of the same model,
  and logits close to the float model's."""
  hf, cfg, params = tiny_pair("qwen3_moe", seed=9, mlp_only_layers=[])
  src, out = str(tmp_path / "float"), str(tmp_path / "gptqmodel")
  hf.save_pretrained(src)
  _tokenizer().save_pretrained(src)
  ids = np.random.default_rng(11).integers(3, 256, (8, 32)).astype(np.int32)
  np.save(tmp_path / "ids.npy", ids)
  run_oracle("quantize", src, str(tmp_path / "ids.npy"), out, "4", str(GROUP), "1", "gptq")
  model_config, qparams, qcfg = import_hf(out)
  assert (qcfg.bits, qcfg.group_size, qcfg.desc_act) == (4, GROUP, True)
  theirs = np.load(os.path.join(out, "dequantized.npz"))
  assert len(theirs.files) == cfg.num_hidden_layers * (4 + 3 * cfg.num_experts)
  for name in theirs.files:
    parts = name.split(".")
    node = qparams[f"layers_{parts[2]}"]
    if parts[4] == "experts":
      w = np.asarray(node["mlp"]["experts"][parts[6]]["kernel"].dequantize())[int(parts[5])]
    else:
      w = np.asarray(node[parts[3]][parts[4]]["kernel"].dequantize())
    np.testing.assert_array_equal(w, theirs[name], err_msg=name)
  ours = str(tmp_path / "ours")
  export_hf(ours, rtn_model(params, qcfg), cfg, qcfg)
  assert _names(ours) == _names(out)
  logits, float_logits = _logits(qparams, model_config), torch_logits(hf, EVAL_IDS)
  assert np.abs(logits - float_logits).mean() < 0.25 * np.abs(float_logits).mean()


def test_orbax_checkpoint_of_experts_round_trips(exports, tmp_path):
  """checkpoint.save / load keeps the stacked packed experts and the MoE config."""
  _, cfg, q, qcfg, _ = exports["mixtral"]
  checkpoint.save(str(tmp_path / "ck"), q, model_config=cfg, quant_config=qcfg)
  back = checkpoint.load(str(tmp_path / "ck"))
  assert back.model_config == cfg and back.quant_config == qcfg
  np.testing.assert_array_equal(_logits(back.params, cfg), _logits(q, cfg))

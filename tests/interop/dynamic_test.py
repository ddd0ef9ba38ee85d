"""Per-module precision (``dynamic``) and a quantized ``lm_head``, end to end: quantize, pack, run,
export, load with GPTQModel (logits equal to ours), import back with identical weights.

Plain ``transformers.AutoModelForCausalLM.from_pretrained`` cannot be the oracle here: through
Optimum 2.3 it builds every block linear with the base bit width and leaves lm_head a float
Linear, so it refuses a mixed-precision folder with a shape mismatch (checked by hand with
transformers 5.24; see docs/format.md). GPTQModel and vLLM read ``dynamic`` and ``lm_head``."""

import json
import os

import jax
import numpy as np

import gptq_jax as gj
from gptq_jax import checkpoint
from gptq_jax.core.weights import PackedWeight
from gptq_jax.interop import export_hf, import_hf
from gptq_jax.models import forward
from gptq_jax.models.safetensors_io import SafetensorsFile
from gptq_jax.models.testing import tiny_pair
from gptq_jax.pipeline import dense_block
from gptq_jax.pipeline.dynamic import untied
from tests.interop.helpers import oracle_logits, tiny_tokenizer

LAYERS = 3
RULES = {r"+:model\.layers\.(0|2)\.mlp\.down_proj": {"bits": 8},  # first and last block
         r"-:model\.layers\.1\.self_attn\.o_proj": {},  # left in float
         r"lm_head": {"bits": 4}}


def _bits(params):
  out = {}
  for i in range(LAYERS):
    for group in ("self_attn", "mlp"):
      for proj, leaf in params[f"layers_{i}"][group].items():
        k = leaf["kernel"]
        out[f"model.layers.{i}.{group}.{proj}"] = k.bits if isinstance(k, PackedWeight) else None
  k = params["lm_head"]["kernel"]
  out["lm_head"] = k.bits if isinstance(k, PackedWeight) else None
  return out


def test_dynamic_and_lm_head_end_to_end(tmp_path):
  _, cfg, params = tiny_pair(1, num_hidden_layers=LAYERS, tie_word_embeddings=True)
  ids = np.random.default_rng(1).integers(3, cfg.vocab_size, (8, 32)).astype(np.int32)
  qcfg = gj.GPTQConfig(3, group_size=32, act_group_aware=False, dynamic=RULES, lm_head=True)
  report = []
  qparams = gj.quantize(params, ids, qcfg, model_config=cfg, mesh=None, progress=False,
                        report=report)
  bits = _bits(qparams)
  expected = {name: 8 if name.endswith("down_proj") and ".1." not in name else 3 for name in bits}
  expected.update({"model.layers.1.self_attn.o_proj": None, "lm_head": 4})
  assert bits == expected
  assert [r["layer"] for r in report if r.get("skipped")] == ["layers.1.self_attn.o_proj"]
  np.testing.assert_array_equal(np.asarray(qparams["layers_1"]["self_attn"]["o_proj"]["kernel"]),
                                np.asarray(params["layers_1"]["self_attn"]["o_proj"]["kernel"]))
  np.testing.assert_array_equal(np.asarray(qparams["embed_tokens"]["embedding"]),  # stays float
                                np.asarray(params["embed_tokens"]["embedding"]))
  model_config = untied(cfg, qparams)
  assert not model_config.tie_word_embeddings and cfg.tie_word_embeddings
  # Packed kernels of three bit widths (and a float one) in one model run as their dequantized copy.
  ours = np.asarray(forward(qparams, model_config, ids[:2]))
  dense = {k: dense_block(v) for k, v in qparams.items()}
  np.testing.assert_allclose(ours, np.asarray(forward(dense, model_config, ids[:2])), rtol=1e-4,
                             atol=1e-4)
  float_logits = np.asarray(forward(params, cfg, ids[:2]))
  assert np.abs(ours - float_logits).max() > 1e-3 * np.abs(float_logits).max()  # lm_head quantized

  folder = str(tmp_path / "hf")
  export_hf(folder, qparams, cfg, qcfg, tokenizer=tiny_tokenizer(cfg.vocab_size))
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  qc = config["quantization_config"]
  assert qc["dynamic"] == RULES and qc["lm_head"] is True and qc["bits"] == 3
  assert config["tie_word_embeddings"] is False
  names = set(SafetensorsFile(os.path.join(folder, "model.safetensors")).keys())
  assert {"lm_head.qweight", "lm_head.scales", "model.embed_tokens.weight",
          "model.layers.1.self_attn.o_proj.weight"} <= names
  assert "lm_head.weight" not in names and "model.layers.1.self_attn.o_proj.qweight" not in names

  read_config, read, read_cfg = import_hf(folder)
  assert read_cfg == qcfg and read_config == model_config and _bits(read) == expected
  for name, a, b in _pairs(read, qparams):
    np.testing.assert_array_equal(np.asarray(a.unpack().codes), np.asarray(b.unpack().codes), name)
    np.testing.assert_array_equal(  # identical dequantized weights (scales are float16 on disk)
        np.asarray(a.dequantize()), np.asarray(_fp16_scales(b).dequantize()), name)
  imported = np.asarray(forward(read, read_config, ids[:2]))

  ckpt = str(tmp_path / "orbax")  # our own checkpoint keeps all of it too
  checkpoint.save(ckpt, qparams, model_config=cfg, quant_config=qcfg)
  back = checkpoint.load(ckpt)
  assert back.quant_config == qcfg and not back.model_config.tie_word_embeddings
  assert _bits(back.params) == expected

  theirs, = oracle_logits([folder], ids[:2], str(tmp_path))  # GPTQModel.load
  err, scale = np.abs(imported - theirs).max(), np.abs(theirs).max()
  assert err <= 1e-4 * scale, f"GPTQModel: max |diff| {err} (logits up to {scale})"


def _pairs(a_params, b_params):
  leaves = lambda p: jax.tree_util.tree_flatten_with_path(
      p, is_leaf=lambda x: isinstance(x, PackedWeight))[0]
  b = dict((jax.tree_util.keystr(k), v) for k, v in leaves(b_params))
  for k, v in leaves(a_params):
    if isinstance(v, PackedWeight):
      yield jax.tree_util.keystr(k), v, b[jax.tree_util.keystr(k)]


def _fp16_scales(w: PackedWeight) -> PackedWeight:
  import jax.numpy as jnp  # noqa: PLC0415

  return w.replace(scales=jnp.asarray(np.asarray(w.scales).astype(np.float16).astype(np.float32)))

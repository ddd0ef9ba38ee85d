"""Every family (Llama, Mistral, Qwen2, Qwen3, Gemma 3 text) against transformers' own model.

The tiny configs (gptq_jax.models.testing.TINY_CONFIGS) use GQA, tied and untied embeddings, biases,
q/k norms, a head_dim that is not hidden / heads, a sliding window (16) shorter than the sequences
(40), and for Gemma 3 sliding and full layers with two RoPE bases.
"""

from __future__ import annotations

import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptq_jax
from gptq_jax import checkpoint
from gptq_jax.eval import generate
from gptq_jax.pipeline import dense_block, rtn_model
from gptq_jax.models import (ModelConfig, ModelParams, forward, load_model, save_hf_folder)
from gptq_jax.models.testing import FAMILY_NAMES, tiny_pair, torch_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ = 40
ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def pair(request):
  return (request.param,) + tiny_pair(request.param, seed=3)


def _ids(batch: int, seq: int, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(3, 256, size=(batch, seq)).astype(np.int32)


def _close(ours, ref, rel=2e-6):
  scale = float(np.abs(ref).max())
  err = float(np.abs(np.asarray(ours) - ref).max())
  assert err < rel * scale, f"max error {err} vs scale {scale}"


def test_config_fields_per_family(pair):
  family, _, cfg, params = pair
  assert cfg.model_type == family and params.config == cfg
  sliding = [t == "sliding_attention" for t in cfg.layer_types]
  expect = {"llama": dict(qk_norm=False, qkv_bias=False, sliding=[False, False]),
            "mistral": dict(qk_norm=False, qkv_bias=False, sliding=[True, True]),
            "qwen2": dict(qk_norm=False, qkv_bias=True, o_bias=False, sliding=[False, True]),
            "qwen3": dict(qk_norm=True, qkv_bias=False, sliding=[False, False]),
            "gemma3_text": dict(qk_norm=True, qkv_bias=False, sliding=[True, False, True],
                                norm_unit_offset=True, sandwich_norms=True, scale_embeddings=True,
                                hidden_act="gelu_pytorch_tanh", query_pre_attn_scalar=24,
                                rope_local_theta=10000.0, rope_theta=100000.0)}[family]
  assert sliding == expect.pop("sliding")
  for k, v in expect.items():
    assert getattr(cfg, k) == v, k
  if family == "gemma3_text":
    assert cfg.rope_scaling.rope_type == "linear" and cfg.rope_local_scaling is None


def test_logits_match_transformers_with_padding(pair):
  """Float32 logits equal transformers' for a plain and a left-padded sequence (the window of 16
  is shorter than the 40 tokens, so sliding layers really drop keys)."""
  family, hf, cfg, params = pair
  ids = _ids(2, SEQ)
  mask = np.ones_like(ids)
  mask[1, :6] = 0
  ref = torch_logits(hf, ids, mask)
  ours = np.asarray(jax.jit(forward, static_argnums=1)(params, cfg, ids, mask))
  _close(ours[0], ref[0])
  _close(ours[1, 6:], ref[1, 6:])
  assert (ours[0].argmax(-1) == ref[0].argmax(-1)).all()


def test_differences_matter():
  """Dropping a family feature breaks agreement, so the test above can fail."""
  _, hf, cfg, params = ("gemma3_text",) + tiny_pair("gemma3_text", seed=3)
  ids = _ids(1, SEQ)
  ref = torch_logits(hf, ids)
  for change in (dict(sliding_window=None), dict(rope_local_theta=None)):
    wrong = np.asarray(forward(params, cfg.replace(**change), ids))
    assert np.abs(wrong - ref).max() > 1e-3 * np.abs(ref).max(), change


def test_cached_generation_equals_transformers(pair):
  """Greedy generation with our KV cache (sliding layers included) equals transformers'; for
  Gemma 3 (sliding and full layers) also the cache-free path."""
  family, hf, cfg, params = pair
  prompt = _ids(1, 20, seed=1)[0]  # + 10 new tokens: past the window of 16
  cached = generate(params, cfg, prompt, max_new_tokens=10)
  if family == "gemma3_text":
    uncached = generate(params, cfg, prompt, max_new_tokens=10, use_cache=False)
    np.testing.assert_array_equal(cached, uncached)
  with torch.no_grad():
    ref = hf.generate(torch.tensor(prompt[None].astype(np.int64)), max_new_tokens=10,
                      do_sample=False, min_new_tokens=10)[0].numpy()
  np.testing.assert_array_equal(cached, ref)


def test_rtn_packed_forward_matches_transformers_on_dequantized(pair):
  """quantize (RTN, 4-bit g16) -> our packed forward == transformers on the dequantized weights;
  q/k norms, biases and the norms stay float."""
  family, hf, cfg, params = pair
  qparams = rtn_model(params, gptq_jax.GPTQConfig(bits=4, group_size=16))
  assert isinstance(qparams, ModelParams) and qparams.config == cfg
  block = qparams["layers_0"]
  assert isinstance(block["self_attn"]["q_proj"]["kernel"], gptq_jax.PackedWeight)
  if cfg.qk_norm:
    assert isinstance(block["self_attn"]["q_norm"]["weight"], jax.Array)
  sd = {k: v.clone() for k, v in hf.state_dict().items()}
  for i in range(cfg.num_hidden_layers):
    d = dense_block(qparams[f"layers_{i}"])
    for mod, proj in (p for g in gptq_jax.models.SEQUENTIAL_GROUPS for p in g):
      sd[f"model.layers.{i}.{mod}.{proj}.weight"] = torch.tensor(
          np.asarray(d[mod][proj]["kernel"]).T.copy())
  deq = type(hf)(hf.config).eval()
  deq.load_state_dict(sd)
  ids = _ids(2, SEQ, seed=2)
  ref = torch_logits(deq, ids)
  ours = np.asarray(forward(qparams, cfg, ids))
  _close(ours, ref, rel=1e-5)
  assert np.abs(ref - torch_logits(hf, ids)).max() > 1e-3  # the quantization changed something


@pytest.mark.parametrize("family,dtype,shard", [
    ("llama", "bfloat16", True), ("mistral", "float16", False), ("qwen2", "float32", True),
    ("qwen3", "bfloat16", False), ("gemma3_text", "float16", True)])
def test_hf_folder_round_trip(family, dtype, shard, tmp_path):
  """transformers' save_pretrained (bf16 / f16 / f32, one file or shards) -> load_model (in that
  dtype) -> save_hf_folder (same dtype, sharded or not) -> transformers loads the same tensors,
  bit for bit, and the same config; logits equal ours."""
  hf, _, _ = tiny_pair(family, seed=4)
  hf = hf.to(getattr(torch, dtype))
  src = tmp_path / "src"
  hf.save_pretrained(src, max_shard_size="60KB" if shard else "50GB")
  assert os.path.isfile(src / "model.safetensors.index.json") == shard
  cfg, params = load_model(str(src), dtype=getattr(jnp, dtype))
  assert isinstance(params, ModelParams) and params.config == cfg and cfg.model_type == family
  assert params["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == getattr(jnp, dtype)
  out = tmp_path / "out"
  save_hf_folder(out, None, params, dtype=None, max_shard_bytes=60_000 if shard else None)
  assert os.path.isfile(out / "model.safetensors.index.json") == shard
  config = json.load(open(out / "config.json"))
  assert config["architectures"] == [ARCHS[family]] and config["model_type"] == family
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype)).eval()
  assert type(back).__name__ == ARCHS[family]
  state = hf.state_dict()
  for name, value in back.state_dict().items():
    assert value.dtype == state[name].dtype, name
    assert torch.equal(value, state[name]), name
  assert ModelConfig.from_hf_dict(back.config.to_dict()) == cfg
  ids = _ids(1, SEQ)
  _close(np.asarray(forward(params, cfg, ids)), torch_logits(back.float(), ids), rel=1e-5)


def test_quantize_needs_no_model_config_for_loaded_params(tmp_path):
  """gptq_jax.quantize(params, calib, cfg) as written, for params from an HF folder (Gemma 3:
  sliding and full blocks) and from the checkpoint loader; the result carries the config."""
  hf, _, _ = tiny_pair("gemma3_text", seed=5, num_hidden_layers=2,
                      layer_types=["sliding_attention", "full_attention"])
  hf.save_pretrained(tmp_path / "g")
  cfg, params = load_model(str(tmp_path / "g"))
  calib = _ids(4, 24, seed=7)
  qcfg = gptq_jax.GPTQConfig(bits=4, group_size=16)
  qparams = gptq_jax.quantize(params, calib, qcfg, progress=False)
  assert isinstance(qparams, ModelParams) and qparams.config == cfg
  ids = _ids(1, SEQ)
  ref = np.asarray(forward(params, None, ids))
  q = np.asarray(forward(qparams, None, ids))
  assert np.isfinite(q).all() and 0 < np.abs(q - ref).max() < 0.5 * np.abs(ref).max()
  checkpoint.save(str(tmp_path / "ckpt"), qparams, model_config=cfg, quant_config=qcfg)
  loaded = checkpoint.load(str(tmp_path / "ckpt"))
  assert isinstance(loaded.params, ModelParams) and loaded.params.config.model_type == "gemma3_text"
  np.testing.assert_allclose(np.asarray(forward(loaded.params, None, ids)), q, rtol=1e-6, atol=1e-6)


def test_bare_dict_gets_a_clear_error():
  _, cfg, params = tiny_pair("qwen3")
  with pytest.raises(ValueError, match="model_config=.*load_model|load_model.*model_config="):
    gptq_jax.quantize(dict(params), _ids(2, 8), gptq_jax.GPTQConfig(bits=4, group_size=16))


def test_unsupported_model_type_lists_the_families():
  d = tiny_pair("llama")[1].to_hf_dict()
  for model_type in ("gpt2", "gemma3", "phi3"):
    with pytest.raises(ValueError, match="llama.*mistral.*qwen2.*qwen3.*gemma3_text"):
      ModelConfig.from_hf_dict(dict(d, model_type=model_type, architectures=None))


def test_model_params_pytree():
  _, cfg, params = tiny_pair("qwen2")
  doubled = jax.tree.map(lambda a: a * 2, params)
  assert isinstance(doubled, ModelParams) and doubled.config == cfg
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  assert "['layers_0']['self_attn']['q_proj']['bias']" in paths
  sums = jax.jit(lambda p: jax.tree.map(jnp.sum, p))(params)
  assert isinstance(sums, ModelParams) and sums.config == cfg
  again = pickle.loads(pickle.dumps(params))
  assert isinstance(again, ModelParams) and again.config == cfg
  with pytest.raises(ValueError, match="ModelConfig"):
    ModelParams({"a": jnp.zeros(1)})


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_config_round_trips_through_transformers(family):
  _, cfg, _ = tiny_pair(family)
  d = cfg.to_hf_dict()
  assert d["architectures"] == [ARCHS[family]] and d["model_type"] == family
  hf_config = transformers.AutoConfig.for_model(**d)
  assert hf_config.model_type == family
  assert ModelConfig.from_hf_dict(hf_config.to_dict()) == cfg


def test_yarn_rope_matches_transformers():
  hf, cfg, params = tiny_pair("qwen3", rope_parameters={
      "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
      "rope_theta": 10000.0, "beta_fast": 16.0})
  assert cfg.rope_scaling.rope_type == "yarn" and cfg.rope_scaling.beta_fast == 16.0
  ids = _ids(1, SEQ)
  ref = torch_logits(hf, ids)
  _close(np.asarray(forward(params, cfg, ids)), ref)
  wrong = np.asarray(forward(params, cfg.replace(rope_scaling=None), ids))
  assert np.abs(wrong - ref).max() > 1e-3 * np.abs(ref).max()

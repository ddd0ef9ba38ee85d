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
from gptq_jax.models import ModelConfig, ModelParams, forward, load_model, save_hf_folder
from gptq_jax.models.params import plain
from gptq_jax.models.testing import (FAMILY_NAMES, assert_close, random_ids, tiny_pair,
                                     torch_logits)
from tests.interop.helpers import importorskip

torch = importorskip("torch")
transformers = importorskip("transformers")

SEQ = 40
ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def pair(request):
  return (request.param,) + tiny_pair(request.param, seed=3)


_forward = jax.jit(forward, static_argnums=1)  # one compile beats op-by-op dispatch here


_ids, _close = random_ids, assert_close


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
  _, hf, cfg, params = pair
  check_padded_logits(hf, cfg, params, SEQ, 6)


def check_padded_logits(hf, cfg, params, seq: int, pad: int, rel: float = 2e-6) -> None:
  """Our logits == transformers' on a full row and a row left-padded by `pad` tokens (max error
  below `rel` times the largest logit)."""
  ids = _ids(2, seq)
  mask = np.ones_like(ids)
  mask[1, :pad] = 0
  ref = torch_logits(hf, ids, mask)
  ours = np.asarray(_forward(params, cfg, ids, mask))
  _close(ours[0], ref[0], rel)
  _close(ours[1, pad:], ref[1, pad:], rel)
  assert (ours[0].argmax(-1) == ref[0].argmax(-1)).all()


def test_differences_matter():
  """Dropping a family feature breaks agreement, so the test above can fail."""
  _, hf, cfg, params = ("gemma3_text",) + tiny_pair("gemma3_text", seed=3)
  ids = _ids(1, SEQ)
  ref = torch_logits(hf, ids)
  for change in (dict(sliding_window=None), dict(rope_local_theta=None)):
    wrong = np.asarray(_forward(params, cfg.replace(**change), ids))
    assert np.abs(wrong - ref).max() > 1e-3 * np.abs(ref).max(), change


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma3_text"])
def test_cached_generation_equals_transformers(family):
  """Greedy generation with our KV cache equals transformers' for the families with sliding
  layers (all of them, the last one, a mix); for Gemma 3 also the cache-free path. (Llama's cache
  is tested in model_test.py; Qwen3 differs from Qwen2 only in what the logits tests cover.)"""
  hf, cfg, params = tiny_pair(family, seed=3)
  prompt = _ids(1, 20, seed=1)[0]  # + 10 new tokens: past the window of 16
  cached = generate(params, cfg, prompt, max_new_tokens=10)
  if family == "gemma3_text":
    uncached = generate(params, cfg, prompt, max_new_tokens=10, use_cache=False)
    np.testing.assert_array_equal(cached, uncached)
  with torch.no_grad():
    ref = hf.generate(torch.tensor(prompt[None].astype(np.int64)), max_new_tokens=10,
                      do_sample=False, min_new_tokens=10)[0].numpy()
  np.testing.assert_array_equal(cached, ref)


def _assert_packed_matches_dequantized(hf, cfg, qparams, ids):
  """Our packed forward == transformers on the dequantized weights (the norms, q/k norms and
  biases untouched), and the quantization did change the logits."""
  sd = {k: v.clone() for k, v in hf.state_dict().items()}
  for i in range(cfg.num_hidden_layers):
    d = dense_block(qparams[f"layers_{i}"])
    for mod, proj in (p for g in gptq_jax.models.SEQUENTIAL_GROUPS for p in g):
      sd[f"model.layers.{i}.{mod}.{proj}.weight"] = torch.tensor(
          np.asarray(d[mod][proj]["kernel"]).T.copy())
  deq = type(hf)(hf.config).eval()
  deq.load_state_dict(sd)
  ref = torch_logits(deq, ids)
  _close(np.asarray(_forward(qparams, None, ids)), ref, rel=1e-5)
  assert np.abs(ref - torch_logits(hf, ids)).max() > 1e-3


def test_rtn_packed_forward_matches_transformers_on_dequantized():
  """RTN (4-bit g16) -> packed forward with Qwen2's biases and tied embeddings (Gemma 3's q/k
  norms are covered by the GPTQ test below)."""
  hf, cfg, params = tiny_pair("qwen2", seed=3)
  qparams = rtn_model(params, gptq_jax.GPTQConfig(bits=4, group_size=16))
  assert isinstance(qparams, ModelParams) and qparams.config == cfg
  attn = qparams["layers_0"]["self_attn"]
  assert isinstance(attn["q_proj"]["kernel"], gptq_jax.PackedWeight)
  assert isinstance(attn["q_norm" if cfg.qk_norm else "q_proj"]["weight" if cfg.qk_norm else "bias"],
                    jax.Array)
  _assert_packed_matches_dequantized(hf, cfg, qparams, _ids(2, SEQ, seed=2))


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
  _close(np.asarray(_forward(params, cfg, ids)), torch_logits(back.float(), ids), rel=1e-5)


def test_quantize_needs_no_model_config_for_loaded_params(tmp_path):
  """gptq_jax.quantize(params, calib, cfg) as written, for params from an HF folder (Gemma 3, a
  sliding and a full block) and from the orbax checkpoint loader; the result carries the config,
  its packed forward equals transformers on the dequantized weights, and its HF GPTQ export has
  Gemma 3's architecture, tensor names and float norms and imports back identically."""
  # Every linear 64 x 64: one compiled GPTQ solver serves the model.
  hf, _, _ = tiny_pair("gemma3_text", seed=5, num_hidden_layers=2, head_dim=16,
                      num_key_value_heads=4, intermediate_size=64,
                      layer_types=["sliding_attention", "full_attention"])
  hf.save_pretrained(tmp_path / "g")
  cfg, params = load_model(str(tmp_path / "g"))
  qcfg = gptq_jax.GPTQConfig(bits=4, group_size=16)
  qparams = gptq_jax.quantize(params, _ids(4, 24, seed=7), qcfg, progress=False)
  assert isinstance(qparams, ModelParams) and qparams.config == cfg
  ids = _ids(1, SEQ)
  _assert_packed_matches_dequantized(hf, cfg, qparams, ids)
  q = np.asarray(_forward(qparams, None, ids))

  checkpoint.save(str(tmp_path / "ckpt"), qparams, model_config=cfg, quant_config=qcfg)
  loaded = checkpoint.load(str(tmp_path / "ckpt"))
  assert isinstance(loaded.params, ModelParams) and loaded.params.config.model_type == "gemma3_text"
  np.testing.assert_allclose(np.asarray(_forward(loaded.params, None, ids)), q, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="model_config="):  # the same weights as a bare dict
    gptq_jax.quantize(dict(params), _ids(4, 24), qcfg, progress=False)

  from gptq_jax.interop import export_hf, import_hf
  folder = export_hf(tmp_path / "gptq", qparams, cfg, qcfg, dtype="float32")
  config = json.load(open(os.path.join(folder, "config.json")))
  assert config["architectures"] == ["Gemma3ForCausalLM"] and config["model_type"] == "gemma3_text"
  from gptq_jax.models.safetensors_io import SafetensorsFile
  names = set(SafetensorsFile(os.path.join(folder, "model.safetensors")).keys())
  assert {"model.layers.1.self_attn.q_norm.weight", "model.layers.0.pre_feedforward_layernorm.weight",
          "model.layers.0.self_attn.o_proj.qweight"} <= names
  assert not any(n.endswith("norm.qweight") for n in names)
  cfg2, params2, _ = import_hf(folder)
  assert cfg2 == cfg and isinstance(params2, ModelParams)
  def same(a, b):  # codes and floats exact; scales as the format stores them (float16)
    if isinstance(b, gptq_jax.PackedWeight):
      for f in ("qweight", "qzeros", "g_idx"):
        np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)))
      np.testing.assert_array_equal(np.asarray(a.scales),
                                    np.asarray(b.scales).astype(np.float16).astype(np.float32))
    else:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  is_packed = lambda x: isinstance(x, gptq_jax.PackedWeight)  # noqa: E731
  jax.tree.map(same, plain(params2), plain(qparams), is_leaf=is_packed)


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
  _close(np.asarray(_forward(params, cfg, ids)), ref)
  wrong = np.asarray(_forward(params, cfg.replace(rope_scaling=None), ids))
  assert np.abs(wrong - ref).max() > 1e-3 * np.abs(ref).max()


def test_one_block_function_per_layer_type():
  """The pipeline runs block i through the adapter of its layer type: Gemma 3's sliding blocks
  0 and 2 share one (so one compiled block function), the full block 1 has its own."""
  from gptq_jax.pipeline.adapter import ModelAdapter, block_adapter
  from gptq_jax.pipeline.capture import runner_for

  _, cfg, params = tiny_pair("gemma3_text")
  adapter = ModelAdapter.for_config(cfg)
  blocks = [block_adapter(adapter, i) for i in range(3)]
  assert blocks[0] is blocks[2] and blocks[0] is not blocks[1]
  assert [b.layer_type for b in blocks] == list(cfg.layer_types)
  assert runner_for(blocks[0], None, "data") is runner_for(blocks[2], None, "data")
  with pytest.raises(ValueError, match="block_adapter"):  # a mixed model needs the block's type
    adapter.run_block(params["layers_0"], jnp.zeros((1, 4, 64)), {
        "positions": jnp.zeros((1, 4), jnp.int32), "attention_mask": jnp.ones((1, 4), jnp.int32)})


def test_gemma_soft_caps():
  """The final logit soft cap matches transformers; an attention soft cap (which transformers'
  Gemma 3 ignores) is refused with a clear error."""
  hf, cfg, params = tiny_pair("gemma3_text", seed=6, final_logit_softcapping=30.0)
  assert cfg.final_logit_softcapping == 30.0
  ids = _ids(1, SEQ)
  ref = torch_logits(hf, ids)
  assert 10.0 < np.abs(ref).max() <= 30.0
  _close(np.asarray(_forward(params, cfg, ids)), ref)
  with pytest.raises(ValueError, match="attn_logit_softcapping"):
    ModelConfig.from_hf_dict(dict(cfg.to_hf_dict(), attn_logit_softcapping=50.0))


@pytest.mark.parametrize("d", [
    dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], vocab_size=256,
         hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=4,
         num_key_value_heads=1, head_dim=32, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
         rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window=512,
         sliding_window_pattern=6, query_pre_attn_scalar=32, hidden_activation="gelu_pytorch_tanh",
         final_logit_softcapping=None, attn_logit_softcapping=None),
    dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=256, hidden_size=64,
         intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
         rope_theta=1_000_000.0, use_sliding_window=False, sliding_window=131072,
         max_window_layers=2, tie_word_embeddings=True),
    dict(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
         use_sliding_window=True, sliding_window=8, max_window_layers=3,
         rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    dict(model_type="mistral", vocab_size=256, hidden_size=64, intermediate_size=128,
         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=None),
], ids=["gemma3-transformers4", "qwen2.5", "qwen3-sliding-yarn", "mistral-v0.3"])
def test_older_config_forms_read_as_transformers_reads_them(d):
  """config.json as older transformers (and the hub) write them: ours == ours of transformers 5's
  reading, and the fields land where they should."""
  d = dict(d, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  ours = ModelConfig.from_hf_dict(d)
  theirs = ModelConfig.from_hf_dict(transformers.AutoConfig.for_model(**d).to_dict())
  assert ours == theirs
  if d["model_type"] == "gemma3_text":
    assert ours.layer_types == ("sliding_attention",) * 5 + ("full_attention", "sliding_attention")
    assert ours.rope_local_theta == 10_000.0 and ours.rope_scaling.factor == 8.0
    assert ours.rope_local_scaling is None and ours.head_dim == 32
  elif d["model_type"] == "qwen2":
    assert ours.sliding_window is None and set(ours.layer_types) == {"full_attention"}
    assert ours.qkv_bias and not ours.o_bias
  elif d["model_type"] == "qwen3":
    assert ours.layer_types == ("full_attention",) * 3 + ("sliding_attention",)
    assert ours.head_dim == 128 and ours.rope_scaling.rope_type == "yarn"
  else:
    assert ours.sliding_window is None and set(ours.layer_types) == {"full_attention"}

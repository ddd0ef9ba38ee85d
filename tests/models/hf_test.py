"""Hugging Face folders: transformers-written folders load tensor for tensor; ours load in
transformers; sharded, bf16 and weights-only .bin checkpoints; clear errors for bad folders."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from gptq_jax.models import (HFCheckpoint, load_layer_params, load_llama,
                                   load_nonlayer_params, load_tokenizer, save_hf_folder)
from gptq_jax.models.safetensors_io import SafetensorsFile, save_safetensors
from gptq_jax.models.testing import tiny_hf_model


def _hf_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  return value.T if path[-1] == "kernel" else value


def _hf_name(path: tuple[str, ...]) -> str:
  names = [p.replace("layers_", "layers.") for p in path[:-1]]
  leaf = {"kernel": "weight", "embedding": "weight"}.get(path[-1], path[-1])
  prefix = "" if names[0] == "lm_head" else "model."
  return prefix + ".".join(names + [leaf])


def _assert_params_equal_state_dict(params, state_dict, tied: bool):
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  seen = set()
  for keys, value in flat:
    path = tuple(k.key for k in keys)
    name = _hf_name(path)
    np.testing.assert_array_equal(_hf_layout(path, np.asarray(value)),
                                  state_dict[name].float().numpy(), err_msg=name)
    seen.add(name)
  expected = set(state_dict) - ({"lm_head.weight"} if tied else set())
  assert seen == expected


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  model = tiny_hf_model(attention_bias=True)
  folder = tmp_path_factory.mktemp("hf")
  model.save_pretrained(folder)
  return model, str(folder)


def test_transformers_folder_round_trips_every_tensor(hf_folder):
  model, folder = hf_folder
  assert os.path.isfile(os.path.join(folder, "model.safetensors"))
  cfg, params = load_llama(folder)
  assert cfg.num_key_value_heads == 2 and cfg.rope_scaling.rope_type == "llama3"
  assert cfg.attention_bias and not cfg.tie_word_embeddings
  _assert_params_equal_state_dict(params, model.state_dict(), tied=False)


def test_saved_folder_loads_in_transformers(hf_folder, tmp_path):
  model, folder = hf_folder
  cfg, params = load_llama(folder)
  save_hf_folder(tmp_path, cfg, params)
  reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
  for name, tensor in model.state_dict().items():
    torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
  assert reloaded.config.rope_scaling["rope_type"] == "llama3" or (
      reloaded.config.rope_parameters["rope_type"] == "llama3")
  cfg2, params2 = load_llama(tmp_path)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_tied_model_round_trip(tmp_path):
  model = tiny_hf_model(tie_word_embeddings=True)
  model.save_pretrained(tmp_path / "a")
  cfg, params = load_llama(tmp_path / "a")
  assert cfg.tie_word_embeddings and "lm_head" not in params
  _assert_params_equal_state_dict(params, model.state_dict(), tied=True)
  save_hf_folder(tmp_path / "b", cfg, params)
  assert "lm_head.weight" not in SafetensorsFile(tmp_path / "b" / "model.safetensors").keys()


def test_sharded_folder_and_single_layer_reads(hf_folder, tmp_path):
  model, _ = hf_folder
  model.save_pretrained(tmp_path, max_shard_size="40KB")
  assert os.path.isfile(tmp_path / "model.safetensors.index.json")
  cfg, params = load_llama(tmp_path)
  _assert_params_equal_state_dict(params, model.state_dict(), tied=False)
  layer1 = load_layer_params(tmp_path, None, 1)
  jax.tree.map(np.testing.assert_array_equal, layer1, params["layers_1"])
  rest = load_nonlayer_params(tmp_path, cfg)
  assert set(rest) == {"embed_tokens", "norm", "lm_head"}
  np.testing.assert_array_equal(rest["lm_head"]["kernel"], params["lm_head"]["kernel"])


def test_bfloat16_checkpoint(tmp_path):
  model = tiny_hf_model().to(torch.bfloat16)
  model.save_pretrained(tmp_path)
  _, params = load_llama(tmp_path)  # float32 params holding the bf16 values exactly
  _assert_params_equal_state_dict(params, model.state_dict(), tied=False)


def test_weights_only_torch_bin(hf_folder, tmp_path):
  model, folder = hf_folder
  os.link(os.path.join(folder, "config.json"), tmp_path / "config.json")
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  _, params = load_llama(tmp_path)
  _assert_params_equal_state_dict(params, model.state_dict(), tied=False)


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned",))


def test_pickle_bin_is_refused(hf_folder, tmp_path):
  _, folder = hf_folder
  os.link(os.path.join(folder, "config.json"), tmp_path / "config.json")
  torch.save({"x": _Evil()}, tmp_path / "pytorch_model.bin")
  with pytest.raises(ValueError, match="weights-only"):
    load_llama(tmp_path)


def _copy_folder(src: str, dst) -> None:
  os.makedirs(dst, exist_ok=True)
  for name in os.listdir(src):
    os.link(os.path.join(src, name), os.path.join(dst, name))


def test_missing_config(hf_folder, tmp_path):
  _, folder = hf_folder
  os.link(os.path.join(folder, "model.safetensors"), tmp_path / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_llama(tmp_path)


def test_missing_weights(hf_folder, tmp_path):
  _, folder = hf_folder
  os.link(os.path.join(folder, "config.json"), tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="has no weights"):
    load_llama(tmp_path)


def test_missing_tensor(hf_folder, tmp_path):
  _, folder = hf_folder
  os.link(os.path.join(folder, "config.json"), tmp_path / "config.json")
  src = SafetensorsFile(os.path.join(folder, "model.safetensors"))
  gone = "model.layers.1.mlp.up_proj.weight"
  save_safetensors(tmp_path / "model.safetensors", {k: src.get(k) for k in src.keys() if k != gone})
  with pytest.raises(ValueError, match=f"missing tensor '{gone}'"):
    load_llama(tmp_path)


def test_wrong_shape(hf_folder, tmp_path):
  _, folder = hf_folder
  os.link(os.path.join(folder, "model.safetensors"), tmp_path / "model.safetensors")
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  config["intermediate_size"] = 96
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=r"gate_proj.weight' has shape \(160, 64\).*\(96, 64\)"):
    load_llama(tmp_path)


@pytest.mark.parametrize("change", [{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
                                    {"architectures": ["MistralForCausalLM"]}])
def test_unsupported_architecture(hf_folder, tmp_path, change):
  _, folder = hf_folder
  os.link(os.path.join(folder, "model.safetensors"), tmp_path / "model.safetensors")
  with open(os.path.join(folder, "config.json")) as f:
    config = dict(json.load(f), **change)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match="unsupported architecture"):
    load_llama(tmp_path)


def test_bad_specs(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such local path.*hub is unreachable offline.*"
                     "local Hugging Face folder"):
    load_llama("meta-llama/Llama-3.2-1B")
  with pytest.raises(FileNotFoundError, match="'out/nope' not found: no such local path"):
    load_llama("out/nope")
  with pytest.raises(FileNotFoundError, match="not found"):
    load_llama(str(tmp_path / "nope"))
  (tmp_path / "w.bin").write_bytes(b"x")
  with pytest.raises(ValueError, match="not a .gguf"):
    load_llama(tmp_path / "w.bin")


def test_checkpoint_reads_lazily(hf_folder):
  _, folder = hf_folder
  ckpt = HFCheckpoint(folder)
  ckpt.layer_params(0)
  assert len(ckpt._files) == 1  # one mmap'd file, tensors read on demand
  with pytest.raises(IndexError):
    ckpt.layer_params(2)


def test_tokenizer_from_folder(smollm2_tokenizer, hf_folder, tmp_path):
  _, folder = hf_folder
  _copy_folder(folder, tmp_path)
  smollm2_tokenizer.save_pretrained(tmp_path)
  tok = load_tokenizer(tmp_path)
  text = "The State of the Union is strong."
  assert tok(text)["input_ids"] == smollm2_tokenizer(text)["input_ids"]
  with pytest.raises(ValueError, match="no tokenizer"):
    load_tokenizer(folder)

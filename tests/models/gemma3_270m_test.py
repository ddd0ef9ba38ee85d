"""The embedded Gemma 3 270M (GGUF Q4_K_M: Q4_K, Q5_0, Q6_K, Q8_0 and F32 tensors) against
transformers' own GGUF loader on the same file: config and every tensor; then (our model) perplexity
on held-out SOTU text with `<bos>` windows and greedy tokens against transformers' Gemma3ForCausalLM,
and GPTQ (4-bit g128 act-order) against round-to-nearest."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _gemma_path() -> str:
  from gptq_jax.models.embedded import gemma3_gguf_path

  try:
    return gemma3_gguf_path()
  except ValueError as e:
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(f"the embedded Gemma 3 270M is missing under CI: {e}")
    pytest.skip(str(e))


@pytest.fixture(scope="module")
def gemma_path():
  return _gemma_path()


@pytest.fixture(scope="module")
def gemma_transformers(gemma_path):
  """transformers' GGUF loader on the file (what `from_pretrained(gguf_file=)` runs, without
  needing accelerate): (config, Gemma3ForCausalLM fp32 with its tensors)."""
  import torch
  import transformers
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

  config = transformers.AutoConfig.for_model(**load_gguf_checkpoint(gemma_path)["config"])
  with torch.device("meta"):  # no random init: every tensor comes from the file
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
  tensors = load_gguf_checkpoint(gemma_path, return_tensors=True, model_to_load=model)["tensors"]
  missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
  assert not unexpected and set(missing) <= {"lm_head.weight"}
  model.tie_weights()
  del tensors
  torch.set_grad_enabled(False)
  return config, model


def test_reader_matches_transformers_gguf_loader(gemma_path, gemma_transformers):
  import torch  # noqa: F401
  import transformers

  from gptq_jax.models.gguf import GGUFCheckpoint

  ref_config, ref_model = gemma_transformers
  ckpt = GGUFCheckpoint(gemma_path)
  hf = ckpt.hf_config
  assert (hf["model_type"], hf["architectures"]) == ("gemma3_text", ["Gemma3ForCausalLM"])
  ours = transformers.AutoConfig.for_model(**hf)
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
              "layer_types", "query_pre_attn_scalar", "max_position_embeddings",
              "tie_word_embeddings", "hidden_activation", "rope_parameters", "bos_token_id",
              "eos_token_id", "pad_token_id", "final_logit_softcapping", "attn_logit_softcapping"):
    assert getattr(ours, key) == getattr(ref_config, key), key
  assert ours.rms_norm_eps == pytest.approx(ref_config.rms_norm_eps, rel=1e-6)
  assert (hf["num_hidden_layers"], hf["hidden_size"], hf["head_dim"], hf["vocab_size"]) == (
      18, 640, 256, 262144)
  assert hf["layer_types"][:6] == ["sliding_attention"] * 5 + ["full_attention"]
  sd = ref_model.state_dict()
  names = ckpt.tensor_names()
  assert set(names) == set(sd) - {"lm_head.weight"}
  for name in names:
    np.testing.assert_array_equal(ckpt.get(name), sd[name].numpy(), err_msg=name)

"""Rotation (pipeline/rotation.py): the rotated float model computes the same logits, in our forward
and in transformers (through the HF state dict), tied and untied; GPTQ on the rotated model of a
model with weight outliers is much closer to the float model than GPTQ on the model itself."""

import numpy as np
import pytest

import gptq_jax as gj
from gptq_jax.models import forward
from gptq_jax.models.hf import to_hf_state_dict
from gptq_jax.models.testing import tiny_pair, torch_logits
from gptq_jax.pipeline import dense_block, quantize
from gptq_jax.pipeline.rotation import check_rotated, orthogonal_matrix, rotate_model

IDS = np.random.default_rng(0).integers(0, 256, (2, 24)).astype(np.int32)


@pytest.mark.parametrize("n", [64, 576, 640, 896, 56])
def test_orthogonal_matrices(n):
  for kind in ("hadamard", "random"):
    Q = orthogonal_matrix(n, kind, seed=3)
    np.testing.assert_allclose(Q @ Q.T, np.eye(n), atol=1e-12)
  Q = orthogonal_matrix(n, "hadamard", seed=3)
  if n != 56:  # 56 = 7 * 8 has no Hadamard factorization here: random block for the 7
    np.testing.assert_allclose(np.abs(Q) * np.sqrt(n), 1.0, atol=1e-12)
  assert not np.allclose(Q, orthogonal_matrix(n, "hadamard", seed=4))  # seeded signs


def _hf_logits_of(hf, cfg, params):
  """transformers' logits for our (rotated) params: load them into a fresh HF model."""
  import torch

  hf_cfg = hf.config.to_dict()
  hf_cfg["tie_word_embeddings"] = cfg.tie_word_embeddings
  model = type(hf)(type(hf.config)(**hf_cfg)).eval()
  sd = {k: torch.tensor(np.asarray(v, np.float32)) for k, v in to_hf_state_dict(cfg,
                                                                                params).items()}
  missing, unexpected = model.load_state_dict(sd, strict=False)
  assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
  return torch_logits(model, IDS)


@pytest.mark.parametrize("tied,hidden,kind,bias", [
    (False, 64, "hadamard", False), (True, 64, "hadamard", False), (True, 48, "hadamard", False),
    (False, 48, "random", True)])  # bias: q/k/v/o biases (o's is rotated with the stream)
def test_rotated_llama_has_the_same_logits(tied, hidden, kind, bias):
  hf, cfg, params = tiny_pair(0, tie_word_embeddings=tied, hidden_size=hidden,
                              head_dim=hidden // 4, attention_bias=bias)
  want = np.asarray(forward(params, cfg, IDS))
  rcfg, rparams = rotate_model(cfg, params, kind, seed=1)
  assert rcfg.tie_word_embeddings is False and "lm_head" in rparams
  got = np.asarray(forward(rparams, rcfg, IDS))
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, atol=2e-5 * scale, rtol=0)
  # The rotation really changed the weights (not an identity), and transformers runs the result.
  q0 = np.asarray(params["layers_0"]["self_attn"]["q_proj"]["kernel"])
  assert not np.allclose(np.asarray(rparams["layers_0"]["self_attn"]["q_proj"]["kernel"]), q0)
  np.testing.assert_allclose(_hf_logits_of(hf, rcfg, rparams), torch_logits(hf, IDS),
                             atol=5e-5 * scale, rtol=0)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_rotated_qwen_has_the_same_logits(family):
  """Qwen2: q/k/v biases and a tied embedding; Qwen3: per-head q/k norms (not rotated)."""
  hf, cfg, params = tiny_pair(family, 0)
  want = torch_logits(hf, IDS)
  rcfg, rparams = rotate_model(cfg, params, "hadamard", seed=2)
  assert rparams.config == rcfg and not rcfg.tie_word_embeddings
  scale = np.abs(want).max()
  np.testing.assert_allclose(np.asarray(forward(rparams, rcfg, IDS)), want, atol=5e-5 * scale,
                             rtol=0)
  np.testing.assert_allclose(_hf_logits_of(hf, rcfg, rparams), want, atol=5e-5 * scale, rtol=0)


def test_gemma_sandwich_norms_are_refused():
  _, cfg, params = tiny_pair("gemma3_text", 0)
  with pytest.raises(ValueError, match="post-feedforward"):
    rotate_model(cfg, params)


def _outlier_rows(cfg, params, factor=16.0, channels=(3, 40)):
  """Another model: two input rows of every linear reading the residual stream scaled up (weight
  outliers, what low-bit grids handle worst and a rotation spreads over all rows)."""
  out = dict(params)
  for i in range(cfg.num_hidden_layers):
    block = dict(params[f"layers_{i}"])
    for sub, projs in (("self_attn", ("q_proj", "k_proj", "v_proj")),
                       ("mlp", ("gate_proj", "up_proj"))):
      linears = dict(block[sub])
      for p in projs:
        K = np.array(linears[p]["kernel"])
        K[list(channels)] *= factor
        linears[p] = {**linears[p], "kernel": K}
      block[sub] = linears
    out[f"layers_{i}"] = block
  return type(params)(out, cfg)


def test_rotation_helps_gptq_on_weight_outliers_and_unrotated_is_refused():
  """GPTQ on the rotated model (4-bit g32) is much closer to the float model than GPTQ on the
  model itself when weights have outlier rows; an unrotated model with a rotation config is
  refused. (With an identity in place of the Hadamard matrix the rotated model does worse.)"""
  _, cfg, params = tiny_pair(0, tie_word_embeddings=True)
  params = _outlier_rows(cfg, params)
  qcfg = gj.GPTQConfig(4, group_size=32)
  with pytest.raises(ValueError, match="not rotated"):
    check_rotated(params, cfg)
  with pytest.raises(ValueError, match="not rotated"):
    quantize(params, IDS, qcfg.replace(rotation="hadamard"), model_config=cfg, mesh=None,
             progress=False)
  calib = np.random.default_rng(2).integers(0, 256, (8, 32)).astype(np.int32)
  held_out = np.random.default_rng(1).integers(0, 256, (4, 32)).astype(np.int32)
  want = np.asarray(forward(params, cfg, held_out), np.float64)

  def error(p, c):  # mean squared logit error against the float model on held-out tokens
    return float(np.mean((np.asarray(forward(dense_block(p), c, held_out), np.float64) - want)**2))

  plain = error(quantize(params, calib, qcfg, model_config=cfg, mesh=None, progress=False), cfg)
  rcfg, rparams = rotate_model(cfg, params, "hadamard", seed=0)
  q = quantize(rparams, calib, qcfg.replace(rotation="hadamard"), model_config=rcfg, mesh=None,
               progress=False)
  assert isinstance(q["layers_1"]["mlp"]["down_proj"]["kernel"], gj.PackedWeight)
  rotated = error(q, rcfg)
  assert rotated < plain / 3, (rotated, plain)  # measured: 4.85 against 22.8
  with pytest.raises(ValueError, match="rotate before quantizing"):
    rotate_model(rcfg, q, "hadamard")

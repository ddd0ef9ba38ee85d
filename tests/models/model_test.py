"""The Flax Llama against transformers' LlamaForCausalLM (torch, CPU) on tiny random configs."""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptq_jax.models import (Linear, LlamaDecoderLayer, block_forward, embed, final_logits,
                                   forward, forward_with_cache, init_kv_cache, init_params, layers)
from gptq_jax.models.testing import tiny_pair, torch_logits

SEQ = 300  # > 128: the chunked causal attention runs with 3 chunks


def _ids(batch: int, seq: int, vocab: int = 256, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, vocab, size=(batch, seq)).astype(np.int32)


def _assert_logits_match(ours: np.ndarray, ref: np.ndarray, rel: float = 1e-5):
  scale = float(np.abs(ref).max())
  np.testing.assert_array_less(np.abs(ours - ref).max(), rel * scale)
  assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("overrides", [
    {},  # GQA, untied embeddings, llama3 rope scaling
    dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True, num_key_value_heads=1,
         rope_scaling=None, rope_theta=500.0),
    dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, num_key_value_heads=4),
], ids=["gqa-untied-llama3", "tied-bias-mqa", "linear-rope-mha"])
def test_logits_match_transformers(overrides):
  hf, cfg, params = tiny_pair(**overrides)
  ids = _ids(2, SEQ)
  ours = np.asarray(jax.jit(forward, static_argnums=1)(params, cfg, ids))
  assert ours.dtype == np.float32 and ours.shape == (2, SEQ, 256)
  _assert_logits_match(ours, torch_logits(hf, ids))


def test_rope_scaling_is_used():
  """Dropping the llama3 scaling must break agreement: the test above can fail."""
  hf, cfg, params = tiny_pair()
  ids = _ids(1, SEQ)
  unscaled = np.asarray(forward(params, cfg.replace(rope_scaling=None), ids))
  assert np.abs(unscaled - torch_logits(hf, ids)).max() > 1e-2


def test_padding_does_not_change_real_tokens():
  hf, cfg, params = tiny_pair()
  ids = _ids(1, 40)
  ref = torch_logits(hf, ids)[0]
  pad = 7
  left = np.concatenate([np.full((1, pad), 3, np.int32), ids], axis=1)
  right = np.concatenate([ids, np.full((1, pad), 3, np.int32)], axis=1)
  mask = np.ones((2, 40 + pad), np.int32)
  mask[0, :pad] = 0
  mask[1, 40:] = 0
  out = np.asarray(forward(params, cfg, np.concatenate([left, right]), mask))
  np.testing.assert_allclose(out[0, pad:], ref, atol=1e-4 * np.abs(ref).max())
  np.testing.assert_allclose(out[1, :40], ref, atol=1e-4 * np.abs(ref).max())
  assert np.isfinite(out).all()


def test_bfloat16_compute_is_close_to_float32():
  _, cfg, params = tiny_pair()
  ids = _ids(1, 64)
  f32 = np.asarray(forward(params, cfg, ids))
  bf16 = forward(params, cfg.replace(dtype="bfloat16"), ids)
  assert bf16.dtype == jnp.float32
  bf16 = np.asarray(bf16)
  assert np.abs(bf16 - f32).max() < 0.05 * np.abs(f32).max()
  assert np.abs(bf16 - f32).max() > 0  # really computed in bf16
  assert (bf16.argmax(-1) == f32.argmax(-1)).mean() > 0.9


def test_blocks_one_at_a_time_equal_forward():
  _, cfg, params = tiny_pair()
  ids = _ids(2, 48)
  mask = np.ones_like(ids)
  mask[0, :5] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  hidden = embed(params, cfg, ids)
  for i in range(cfg.num_hidden_layers):
    via_module = LlamaDecoderLayer(cfg).apply({"params": params[f"layers_{i}"]}, hidden,
                                              positions=positions, attention_mask=mask)
    hidden = jax.jit(block_forward, static_argnums=1)(params[f"layers_{i}"], cfg, hidden,
                                                      positions, mask)
    np.testing.assert_allclose(np.asarray(via_module), np.asarray(hidden), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(final_logits(params, cfg, hidden)),
                             np.asarray(forward(params, cfg, ids, mask)), rtol=1e-5, atol=1e-5)


def test_linear_inputs_can_be_intercepted():
  """The pipeline captures each projection's input by module path through intercept_methods."""
  _, cfg, params = tiny_pair()
  ids = _ids(1, 12)
  seen = {}

  def capture(next_fun, args, kwargs, context):
    if isinstance(context.module, Linear) and context.method_name == "__call__":
      seen[context.module.path] = args[0].shape
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(capture):
    forward(params, cfg, ids)
  projs = [("self_attn", p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
      ("mlp", p) for p in ("gate_proj", "up_proj", "down_proj")]
  for i in range(cfg.num_hidden_layers):
    for proj in projs:
      assert (f"layers_{i}",) + proj in seen
  assert seen[("layers_0", "mlp", "down_proj")] == (1, 12, cfg.intermediate_size)
  assert seen[("lm_head",)] == (1, 12, cfg.hidden_size)


@flax.struct.dataclass
class _FakePacked:
  qweight: jax.Array  # deliberately not [in, out]
  scale: jax.Array


def test_linear_passes_non_array_kernels_to_linear_apply(monkeypatch):
  got = []

  def fake_apply(x, kernel, bias, dtype, backend="auto"):
    got.append(kernel)
    return x[..., :2] * kernel.scale

  monkeypatch.setattr(layers, "linear_apply", fake_apply)
  packed = _FakePacked(jnp.zeros((3, 2), jnp.int32), jnp.float32(2.0))
  out = Linear(16, 2).apply({"params": {"kernel": packed}}, jnp.ones((1, 16)))
  assert isinstance(got[0], _FakePacked) and got[0].qweight.shape == (3, 2)
  assert float(out[0, 0]) == 2.0


def test_kv_cache_prefill_and_decode_equal_forward():
  _, cfg, params = tiny_pair()
  ids = _ids(2, 24)
  mask = np.ones_like(ids)
  mask[1, :3] = 0  # left padding
  full = np.asarray(forward(params, cfg, ids, mask))
  prompt = 16
  cache_mask = jnp.asarray(mask)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  cache = init_kv_cache(cfg, 2, 24)
  logits, cache = forward_with_cache(params, cfg, ids[:, :prompt], cache, 0, cache_mask,
                                     positions[:, :prompt])
  np.testing.assert_allclose(np.asarray(logits)[0], full[0, :prompt], atol=1e-4)
  np.testing.assert_allclose(np.asarray(logits)[1, 3:], full[1, 3:prompt], atol=1e-4)
  step = jax.jit(forward_with_cache, static_argnums=1)
  for t in range(prompt, 24):
    logits, cache = step(params, cfg, ids[:, t:t + 1], cache, jnp.int32(t), cache_mask,
                         positions[:, t:t + 1])
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=1e-4)


def test_init_params_tree_mirrors_hf_names():
  hf, cfg, params = tiny_pair()
  fresh = init_params(cfg, 1)
  assert jax.tree.structure(fresh) == jax.tree.structure(params)
  assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, params)
  assert fresh["layers_1"]["self_attn"]["k_proj"]["kernel"].shape == (64, 32)  # [in, out]
  assert "lm_head" in fresh
  _, tied_cfg, tied = tiny_pair(tie_word_embeddings=True)
  assert "lm_head" not in tied and "lm_head" not in init_params(tied_cfg)

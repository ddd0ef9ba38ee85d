"""The Llama run from packed GPTQ weights equals the float Llama run on the dequantized weights.

A tiny config whose seven projections all fit the TPU kernel's tiling (hidden 128, MLP 256,
4-bit, group 64), so ``backend="pallas_interpret"`` really runs the Pallas kernel body on CPU for
every linear; one projection is act-order (non-monotone ``g_idx``) to exercise ``prepare_params``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptq_jax import PackedWeight
from gptq_jax.kernels import PreparedWeight, prepare_params
from gptq_jax.models import LlamaConfig, forward, forward_with_cache, init_kv_cache, init_params
from tests.kernels.helpers import LogCapture, make_quantized

CFG = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
PROJS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
         ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
GROUP = 64


def _quantized_params(seed: int = 0):
  """(packed params, the same params with every kernel dequantized to float32)."""
  params = init_params(CFG, seed)
  params = jax.tree.map(lambda a: a * 3.0 if a.ndim == 2 else a, params)  # logits of order 1
  packed, dense = dict(params), dict(params)
  for i in range(CFG.num_hidden_layers):
    copy = lambda: jax.tree.map(lambda a: a, params[f"layers_{i}"])  # noqa: E731 (new dicts)
    layer_p, layer_d = copy(), copy()
    for j, (mod, proj) in enumerate(PROJS):
      kernel = params[f"layers_{i}"][mod][proj]["kernel"]
      # Random codes, scales and zeros; layer 1's gate_proj is act-order (non-monotone g_idx).
      act_order = (i, proj) == (1, "gate_proj")
      q = make_quantized(*kernel.shape, 4, GROUP, act_order=act_order, seed=10 * i + j)
      q = q.replace(scales=q.scales * 0.02)
      layer_p[mod][proj] = {"kernel": q.pack("gptq" if i == 0 else "gptq_v2")}
      layer_d[mod][proj] = {"kernel": layer_p[mod][proj]["kernel"].dequantize()}
    packed[f"layers_{i}"], dense[f"layers_{i}"] = layer_p, layer_d
  return packed, dense


@pytest.fixture(scope="module")
def tiny_quantized():
  return _quantized_params()


def _ids(batch: int, seq: int) -> np.ndarray:
  return np.random.default_rng(3).integers(0, CFG.vocab_size, (batch, seq)).astype(np.int32)


def _decode(params, cfg, ids, prompt: int):
  """Prefill ``prompt`` tokens, then decode the rest one by one -> logits [batch, seq, vocab]."""
  b, t = ids.shape
  mask = jnp.ones((b, t), jnp.int32)
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
  cache = init_kv_cache(cfg, b, t)
  logits, cache = forward_with_cache(params, cfg, ids[:, :prompt], cache, 0, mask,
                                     positions[:, :prompt])
  out = [np.asarray(logits)]
  step = jax.jit(forward_with_cache, static_argnums=1)
  for i in range(prompt, t):
    logits, cache = step(params, cfg, ids[:, i:i + 1], cache, jnp.int32(i), mask,
                         positions[:, i:i + 1])
    out.append(np.asarray(logits))
  return np.concatenate(out, axis=1)


def test_packed_params_hold_packed_weights(tiny_quantized):
  packed, dense = tiny_quantized
  kernel = packed["layers_0"]["mlp"]["down_proj"]["kernel"]
  assert isinstance(kernel, PackedWeight) and kernel.qweight.dtype == jnp.int32
  assert kernel.qweight.shape == (CFG.intermediate_size * 4 // 32, CFG.hidden_size)
  assert isinstance(dense["layers_0"]["mlp"]["down_proj"]["kernel"], jax.Array)


@pytest.mark.parametrize("backend", ["xla", "pallas_interpret"])
def test_packed_llama_logits_equal_dequantized_float_llama(tiny_quantized, backend):
  packed, dense = tiny_quantized
  ids = _ids(2, 10)
  want = np.asarray(forward(dense, CFG, ids))
  assert np.abs(want).max() > 0.5  # the comparison below is not between near-zero logits
  cfg = CFG.replace(backend=backend)
  with LogCapture() as log:
    got = np.asarray(forward(prepare_params(packed), cfg, ids))
    raw = np.asarray(forward(packed, cfg, ids))  # raw PackedWeights: act-order checked at run time
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(raw, want, atol=2e-4, rtol=1e-4)
  # pallas_interpret: every projection fits the TPU kernel, so nothing fell back to XLA.
  assert not [m for m in log.messages if "cannot run" in m], log.messages


@pytest.mark.parametrize("backend", ["xla", "pallas_interpret"])
def test_packed_llama_prefill_and_decode_equal_float(tiny_quantized, backend):
  packed, dense = tiny_quantized
  ids = _ids(2, 9)
  want = np.asarray(forward(dense, CFG, ids))
  got = _decode(prepare_params(packed), CFG.replace(backend=backend), ids, prompt=6)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_prepare_params_makes_every_projection_kernel_ready(tiny_quantized):
  packed, _ = tiny_quantized
  prepared = prepare_params(packed)
  kernels = [prepared[f"layers_{i}"][m][p]["kernel"] for i in range(2) for m, p in PROJS]
  assert all(isinstance(k, PreparedWeight) for k in kernels)
  assert prepared["layers_1"]["mlp"]["gate_proj"]["kernel"].perm is not None  # act-order
  assert prepared["layers_0"]["mlp"]["gate_proj"]["kernel"].perm is None
  assert prepared["embed_tokens"]["embedding"] is packed["embed_tokens"]["embedding"]


def test_llama_config_rejects_unknown_backend():
  with pytest.raises(ValueError, match="backend"):
    CFG.replace(backend="cuda")

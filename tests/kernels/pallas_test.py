"""The Pallas kernels in interpret mode (CPU) against the oracle (unpack -> dequantize -> dot).

* TPU (Mosaic) kernel: through ``quantized_matmul(backend="pallas_interpret")``, for 2/4/8 bits,
  group sizes 32/128/-1, natural and act-order ``g_idx`` (``prepare_for_kernel``), batch 1..64.
  Where ``can_use_kernel`` refuses (2- and 4-bit with group 32: fewer than 8 word rows per group),
  the test asserts that the XLA path ran and that the fallback was logged with the reason.
* 3-bit: neither kernel unpacks 3-bit words (values straddle words); it runs on the XLA path,
  and the log says so.
* GPU (Triton) kernel body: ``pallas_gpu.matmul(..., interpret=True)`` with ``choose_gpu`` blocks.
* Shapes that do not fit the preferred blocks (K = 576 with a partial last group, N = 100,
  M = 7 / 33 / 40) are either tiled and checked, or refused with a reason.
"""

import itertools

import jax
import jax.numpy as jnp
import pytest

from gptq_jax.kernels import block_sizes, can_use_kernel, pallas_gpu, prepare_for_kernel, quantized_matmul
from tests.kernels.helpers import LogCapture, assert_matmul_close, make_quantized, make_x


def _uses_pallas(f, *args) -> bool:
  return "pallas_call" in str(jax.make_jaxpr(f)(*args))


def _interpret(x, w):
  return quantized_matmul(x, w, backend="pallas_interpret")


TPU_CASES = [(b, g, a, m) for (b, g, a), m in zip(
    itertools.product((2, 4, 8), (32, 128, -1), (False, True)), itertools.cycle((1, 5, 16, 64, 33)))]


@pytest.mark.parametrize("bits,group_size,act_order,m", TPU_CASES)
def test_tpu_kernel_interpret_equals_reference(bits, group_size, act_order, m):
  q = make_quantized(256, 256, bits, group_size, act_order=act_order, seed=bits + m)
  w = prepare_for_kernel(q.pack("gptq" if m % 2 else "gptq_v2"))
  x = make_x((m, 256), seed=m)
  ok, why = can_use_kernel(x, w, platform="tpu")
  with LogCapture() as log:
    y = _interpret(x, w)
  assert_matmul_close(y, x, q.dequantize())
  fallbacks = [msg for msg in log.messages if "cannot run" in msg]
  assert _uses_pallas(_interpret, x, w) == ok
  if ok:
    assert not fallbacks, fallbacks
  else:
    assert bits in (2, 4) and group_size == 32, why  # the only refusals at this shape
    assert "group_size=32" in why and len(fallbacks) == 1 and why in fallbacks[0]


@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_three_bit_runs_on_the_xla_path_and_says_so(group_size):
  q = make_quantized(256, 128, 3, group_size, seed=3)
  w = prepare_for_kernel(q.pack())
  x = make_x((4, 256))
  ok, why = can_use_kernel(x, w, platform="tpu")
  assert not ok and "3-bit" in why
  assert not can_use_kernel(x, w, platform="gpu")[0]
  with LogCapture() as log:
    y = _interpret(x, w)
  assert_matmul_close(y, x, q.dequantize())
  assert not _uses_pallas(_interpret, x, w)
  assert any("3-bit" in msg and "using the XLA path" in msg for msg in log.messages), log.messages


GPU_CASES = [(b, g, a, m) for (b, g, a), m in zip(
    itertools.product((2, 4, 8), (32, 128, -1), (False, True)), itertools.cycle((1, 16, 64, 7)))]


@pytest.mark.parametrize("bits,group_size,act_order,m", GPU_CASES)
def test_gpu_kernel_body_interpret_equals_reference(bits, group_size, act_order, m):
  q = make_quantized(256, 128, bits, group_size, act_order=act_order, seed=bits * m)
  w = prepare_for_kernel(q.pack())
  x = make_x((m, 256), seed=m)
  blocks = block_sizes.choose("gpu", m, 256, 128, bits, group_size, 4)
  assert isinstance(blocks, block_sizes.BlockSizes), blocks
  xk = x if w.perm is None else x[:, w.perm]
  y = jax.jit(lambda x, w: pallas_gpu.matmul(
      x, w.qweight, w.scales, w.zeros, bits=bits, group_size=group_size, blocks=blocks,
      interpret=True))(xk, w)
  assert_matmul_close(y, x, q.dequantize())


@pytest.mark.parametrize("k,bits,dtype", [
    (576, 4, jnp.bfloat16), (576, 4, jnp.float32), (320, 8, jnp.bfloat16)])
def test_tpu_kernel_bf16_and_partial_last_group(k, bits, dtype):
  # SmolLM2's hidden size 576 = 4.5 groups of 128 (320 = 2.5): K-steps must lie inside one group.
  q = make_quantized(k, 192, bits, 128, seed=11, scales_dtype=jnp.float16)
  w = prepare_for_kernel(q.pack())
  x = make_x((3, 2, k), dtype)
  ok, why = can_use_kernel(x, w, platform="tpu")
  assert ok and "bk=64" in why, why
  y = _interpret(x, w)
  assert y.dtype == dtype and y.shape == (3, 2, 192)
  assert_matmul_close(y, x, q.dequantize())
  assert _uses_pallas(_interpret, x.reshape(6, k), w)


def test_odd_output_width_tiled_on_tpu_refused_on_gpu():
  q = make_quantized(256, 100, 8, 64, seed=2)  # N = 100: not a lane multiple, not a power of two
  w = prepare_for_kernel(q.pack())
  x = make_x((40, 256))
  assert can_use_kernel(x, w, platform="tpu")[0]
  ok, why = can_use_kernel(x, w, platform="cuda")
  assert not ok and "out_features=100" in why
  assert_matmul_close(_interpret(x, w), x, q.dequantize())


@pytest.mark.parametrize("k,bits,group_size,match", [
    (96, 4, 32, "group_size=32"),  # 4 word rows per group
    (96, 2, -1, "in_features=96"),  # no chunk of 128 rows (8 words x 16 values) divides 96
])
def test_shapes_without_tpu_blocks_are_refused_with_a_reason_and_still_correct(
    k, bits, group_size, match):
  q = make_quantized(k, 128, bits, group_size, seed=k)
  w = prepare_for_kernel(q.pack("gptq_v2"))
  x = make_x((2, k))
  ok, why = can_use_kernel(x, w, platform="tpu")
  assert not ok and match in why, why
  with LogCapture() as log:
    y = _interpret(x, w)
  assert_matmul_close(y, x, q.dequantize())
  assert any(why in msg for msg in log.messages), log.messages


def test_can_use_kernel_reasons():
  w = prepare_for_kernel(make_quantized(256, 128, 4, 128).pack())
  assert not can_use_kernel(make_x((2, 256), jnp.float16), w, platform="tpu")[0]
  assert "float16" in can_use_kernel(make_x((2, 256), jnp.float16), w, platform="tpu")[1]
  assert can_use_kernel(make_x((2, 256), jnp.float16), w, platform="gpu")[0]
  assert "no Pallas kernel" in can_use_kernel(make_x((2, 256)), w, platform="cpu")[1]
  ok, why = can_use_kernel(jax.ShapeDtypeStruct((4, 3, 256), jnp.bfloat16), w, platform="tpu")
  assert ok and "bm=16" in why  # 12 rows padded to the bf16 sublane tile

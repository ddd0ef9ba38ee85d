"""The kernels lower for TPU (Mosaic) and CUDA (Triton) from this CPU machine.

``quantized_matmul(backend="pallas")`` is lowered with ``lowering_platforms=("tpu",)`` and exported
with ``jax.export`` for ``cuda``; weights are ``jax.ShapeDtypeStruct`` pytrees, so real model
shapes cost no memory. Wherever ``can_use_kernel`` accepts, the module must hold the kernel's
custom call (``tpu_custom_call`` / the Triton call) under the kernel's name; wherever it refuses,
the module must not (the XLA path runs), and the reason must be logged.

What this proves and what it does not: JAX's Pallas -> Mosaic and Pallas -> Triton lowering runs
here (block-shape rules, supported primitives, shapes of every op in the kernel body); the Mosaic
layout passes and Triton's PTX compilation run only on the device (libtpu / XLA:GPU).
"""

import itertools

import jax
import jax.numpy as jnp
import pytest

from gptq_jax.kernels import PreparedWeight, can_use_kernel, quantized_matmul
from tests.kernels.helpers import LogCapture

S = jax.ShapeDtypeStruct
TRITON = "__gpu$xla.gpu.triton"
CUSTOM_CALL = {"tpu": "@tpu_custom_call", "cuda": f"@{TRITON}"}
KERNEL_NAME = {"tpu": "gptq_matmul_tpu_{}bit", "cuda": "gptq_matmul_gpu_{}bit"}


def weight_struct(k: int, n: int, bits: int, group_size: int, *, act_order: bool = False,
                  scales_dtype=jnp.float16) -> PreparedWeight:
  groups = 1 if group_size == -1 else -(-k // group_size)
  return PreparedWeight(qweight=S((k * bits // 32, n), jnp.int32),
                        scales=S((groups, n), scales_dtype), zeros=S((groups, n), scales_dtype),
                        perm=S((k,), jnp.int32) if act_order else None, bits=bits,
                        group_size=group_size)


def lowered_text(platform: str, x: S, w: PreparedWeight) -> str:
  f = jax.jit(lambda x, w: quantized_matmul(x, w, backend="pallas"))
  if platform == "tpu":
    return f.trace(x, w).lower(lowering_platforms=("tpu",)).as_text()
  checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)]
  return jax.export.export(f, platforms=("cuda",), disabled_checks=checks)(x, w).mlir_module()


def check_lowering(platform: str, x: S, w: PreparedWeight) -> bool:
  """Lowers ``x @ w`` for ``platform``; asserts the kernel is there iff ``can_use_kernel``, and
  that a refusal's reason is logged. (Every platform's branch is traced, and logs, at the first
  lowering of a shape; later lowerings reuse the trace, so the log is kept across platforms.)"""
  ok, why = can_use_kernel(x, w, platform=platform)
  text = lowered_text(platform, x, w)
  has_kernel = CUSTOM_CALL[platform] in text
  assert has_kernel == ok, (platform, why)
  if ok:
    assert text.count(CUSTOM_CALL[platform]) == 1
    assert KERNEL_NAME[platform].format(w.bits) in text
  else:
    assert any(why in msg for msg in LOG.messages), (why, LOG.messages)
  return ok


LOG = LogCapture()


@pytest.fixture(autouse=True)
def _capture_logs():
  with LOG:
    yield


GRID = list(itertools.product((2, 4, 8), (32, 128, -1), (1, 16, 64), (jnp.float32, jnp.bfloat16)))


@pytest.mark.parametrize("bits,group_size,m,dtype", GRID)
def test_kernel_lowers_for_tpu_and_cuda(bits, group_size, m, dtype):
  w = weight_struct(512, 256, bits, group_size, act_order=m == 16)
  x = S((m, 512), dtype)
  accepted = {p: check_lowering(p, x, w) for p in ("tpu", "cuda")}
  # The GPU kernel takes every 2/4/8-bit configuration here; the TPU kernel all but the groups
  # with fewer than 8 word rows (2- and 4-bit with group 32).
  assert accepted["cuda"]
  assert accepted["tpu"] == (group_size != 32 or bits == 8)


MODEL_SHAPES = [  # (in, out): SmolLM2-135M's projections, then a Llama-7B MLP pair
    (576, 576), (576, 192), (576, 1536), (1536, 576), (4096, 11008), (11008, 4096)]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("k,n", MODEL_SHAPES)
def test_model_shapes_take_the_kernel(platform, k, n):
  for m, dtype in ((1, jnp.bfloat16), (64, jnp.float32)):
    assert check_lowering(platform, S((m, k), dtype), weight_struct(k, n, 4, 128, act_order=True))


def test_refused_configurations_lower_to_the_xla_path():
  x = S((4, 256), jnp.bfloat16)
  assert not check_lowering("tpu", x, weight_struct(256, 128, 3, 128))
  assert not check_lowering("cuda", x, weight_struct(256, 128, 3, 128))
  assert not check_lowering("cuda", x, weight_struct(256, 96 + 4, 8, 128))  # N = 100
  assert not check_lowering("tpu", S((4, 256), jnp.float16), weight_struct(256, 128, 4, 128))

"""``quantized_matmul``: ``x @ W`` straight from packed GPTQ weights, with backend dispatch.

Backends (``GPTQConfig.backend``):
* ``"auto"``: the Pallas kernel on TPU (Mosaic) and on CUDA GPUs (Triton), the XLA path anywhere
  else (CPU). The choice is made at lowering time with ``lax.platform_dependent``, so one jitted
  function serves every platform, and ``lower(lowering_platforms=("tpu",))`` on a CPU machine
  lowers the TPU kernel.
* ``"xla"``: unpack -> dequantize -> dot in XLA (``reference.xla_matmul``).
* ``"pallas"``: like "auto", but meant as "I want the kernel": on a platform without a Pallas
  kernel (CPU, ROCm) the XLA path runs and a warning is logged once (use "pallas_interpret" to run
  the kernel on CPU).
* ``"pallas_interpret"``: the TPU kernel body in Pallas interpret mode, on any platform (tests).

Whenever a kernel cannot take a weight (``can_use_kernel`` says why: 3-bit, a group size the TPU
tiling cannot broadcast, a shape without legal blocks, an unsupported dtype) the XLA path runs and
the reason is logged once on the ``gptq_jax`` logger. Nothing falls back silently.

Act-order: a ``PreparedWeight`` (``prepare_for_kernel``, once at load) has contiguous groups and an
activation permutation. A raw ``PackedWeight`` is checked: with a concrete ``g_idx`` statically, with
a traced one (inside ``jit``) by a ``lax.cond`` on ``g_idx == arange(K) // group_size``, whose false
branch gathers scales per row on the XLA path.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gptq_jax.core.weights import PackedWeight
from gptq_jax.kernels import block_sizes, pallas_gpu, pallas_tpu, reference
from gptq_jax.kernels.prepare import PreparedWeight, decoded_zeros, is_natural, trivial_g_idx

logger = logging.getLogger("gptq_jax")

BACKENDS = ("auto", "xla", "pallas", "pallas_interpret")
_KERNEL_DTYPES = {"tpu": (jnp.float32, jnp.bfloat16),
                  "gpu": (jnp.float32, jnp.bfloat16, jnp.float16)}
_logged: set[str] = set()


def _log_once(level: int, msg: str) -> None:
  if msg not in _logged:
    _logged.add(msg)
    logger.log(level, msg)


def _check_backend(backend) -> str:
  b = "auto" if backend is None else backend
  if not isinstance(b, str) or b.lower() not in BACKENDS:
    raise ValueError(f"backend={backend!r} is not allowed: backend must be one of {BACKENDS}")
  return b.lower()


def _plan(platform: str, m: int, w, dtype, generation: str | None = None
          ) -> block_sizes.BlockSizes | str:
  """Block sizes for the kernel of ``platform`` ("tpu" | "gpu"), or the reason it cannot run
  (TPU: for ``generation``, default ``block_sizes.tpu_generation()``)."""
  dtype = jnp.dtype(dtype)
  if dtype not in [jnp.dtype(d) for d in _KERNEL_DTYPES[platform]]:
    names = ", ".join(jnp.dtype(d).name for d in _KERNEL_DTYPES[platform])
    return f"activations of dtype {dtype.name}: the {platform} kernel takes {names}"
  if not jnp.issubdtype(w.scales.dtype, jnp.floating):
    return f"scales of dtype {w.scales.dtype}: the kernel needs floating-point scales"
  k, n = w.shape
  if platform == "tpu":
    return block_sizes.choose_tpu(m, k, n, w.bits, w.group_size, dtype.itemsize, generation)
  return block_sizes.choose(platform, m, k, n, w.bits, w.group_size, dtype.itemsize)


def can_use_kernel(x, w: PackedWeight | PreparedWeight, *, platform: str = "tpu") -> tuple[bool, str]:
  """Whether the Pallas kernel of ``platform`` ("tpu" or "gpu"/"cuda") can compute ``x @ w``.

  ``x``: the activations (an array or ``jax.ShapeDtypeStruct`` ``[..., K]``). Returns ``(True,
  "block sizes ...")`` or ``(False, reason)``; when False, ``quantized_matmul`` runs the XLA path
  and logs the reason.
  """
  platform = {"cuda": "gpu"}.get(platform, platform)
  if platform not in _KERNEL_DTYPES:
    return False, f"platform={platform!r} has no Pallas kernel (only 'tpu' and 'gpu'/'cuda')"
  if not isinstance(w, (PackedWeight, PreparedWeight)):
    return False, f"{type(w).__name__} is not a PackedWeight or PreparedWeight"
  m = int(np.prod(x.shape[:-1], dtype=np.int64))
  plan = _plan(platform, m, w, x.dtype)
  if isinstance(plan, str):
    return False, plan
  return True, f"block sizes {plan}"


def _as_contiguous(w: PackedWeight) -> PreparedWeight:
  """A raw PackedWeight seen as kernel-ready, assuming natural ``g_idx`` (zeros decoded per call)."""
  return PreparedWeight(qweight=w.qweight, scales=w.scales, zeros=decoded_zeros(w), perm=None,
                        bits=w.bits, group_size=w.group_size)


def _xla(x: jax.Array, w: PreparedWeight) -> jax.Array:
  if reference.xla_chunk_size(w.in_features, w.group_size, w.bits) is None:
    _log_once(logging.WARNING, f"gptq_jax: {w.shape[0]}x{w.shape[1]} {w.bits}-bit group_size="
              f"{w.group_size} weight: no chunking of its rows by whole runs of packed values; "
              "the XLA path dequantizes the whole weight per call (slow)")
    return reference.gather_matmul(x, w).astype(x.dtype)
  return reference.xla_matmul(x, w).astype(x.dtype)


def _kernel_or_xla(platform: str, interpret: bool, loud: bool, generation: str):
  """The branch for one platform: its kernel if it can take the weight, else the XLA path."""
  def branch(x, w):
    plan = _plan(platform, x.shape[0], w, x.dtype, generation)
    if isinstance(plan, str):
      if loud:
        _log_once(logging.WARNING, f"gptq_jax: {w.shape[0]}x{w.shape[1]} {w.bits}-bit "
                  f"group_size={w.group_size} weight: the {platform} Pallas kernel cannot run "
                  f"({plan}); using the XLA path")
      return _xla(x, w)
    mod = pallas_tpu if platform == "tpu" else pallas_gpu
    return mod.matmul(x, w.qweight, w.scales, w.zeros, bits=w.bits, group_size=w.group_size,
                      blocks=plan, interpret=interpret)
  return branch


def _contiguous_matmul(x: jax.Array, w: PreparedWeight, backend: str, generation: str
                       ) -> jax.Array:
  """``x [M, K]`` in ``w``'s row order -> ``[M, N]`` in ``x.dtype``."""
  if backend == "xla":
    return _xla(x, w)
  if backend == "pallas_interpret":
    return _kernel_or_xla("tpu", True, True, generation)(x, w)
  here = jax.default_backend()
  if backend == "pallas" and here not in ("tpu", "gpu"):
    _log_once(logging.WARNING, f"gptq_jax: backend='pallas' on {here}: there is no Pallas kernel "
              "for this platform, the XLA path runs (backend='pallas_interpret' runs the kernel "
              "in interpret mode)")
  loud = backend == "pallas"
  return lax.platform_dependent(
      x, w,
      tpu=_kernel_or_xla("tpu", False, loud or here == "tpu", generation),
      cuda=_kernel_or_xla("gpu", False, loud or here == "gpu", generation),
      default=_xla)


def _matmul_2d(x: jax.Array, w, backend: str, g_idx_mode: str, generation: str) -> jax.Array:
  """x [M, K] -> [M, N]. g_idx_mode (PackedWeight only): "natural", "act_order" or "runtime"."""
  if isinstance(w, PreparedWeight):
    if w.perm is not None:
      x = jnp.take(x, w.perm, axis=1)
    return _contiguous_matmul(x, w, backend, generation)
  fast = lambda x, w: _contiguous_matmul(x, _as_contiguous(w), backend, generation)  # noqa: E731
  slow = lambda x, w: reference.gather_matmul(x, w).astype(x.dtype)  # noqa: E731
  if g_idx_mode == "natural":
    return fast(x, w)
  if g_idx_mode == "act_order":
    return slow(x, w)
  return lax.cond(trivial_g_idx(w.g_idx, w.group_size), fast, slow, x, w)


@functools.partial(jax.jit, static_argnames=("backend", "g_idx_mode", "generation"))
def _quantized_matmul(x: jax.Array, w, backend: str, g_idx_mode: str, generation: str
                      ) -> jax.Array:
  k, n = w.shape
  lead = x.shape[:-1]
  y = _matmul_2d(x.reshape(-1, k), w, backend, g_idx_mode, generation)
  return y.reshape(*lead, n)


def quantized_matmul(x: jax.Array, w: PackedWeight | PreparedWeight, *,
                     backend: str = "auto") -> jax.Array:
  """``x [..., K] @ w.dequantize() -> [..., N]`` in ``x.dtype`` (float32 accumulation).

  ``w``: a ``PackedWeight`` (Hugging Face GPTQ layout) or a ``PreparedWeight``. ``backend``: one
  of "auto", "xla", "pallas", "pallas_interpret" (module docstring). Jitted; usable inside jit and
  inside a Flax module with the weight pytree taken from the params. A raw ``PackedWeight`` with a
  concrete ``g_idx`` is checked for act-order here, once per call; with a traced one, at run time.
  """
  backend = _check_backend(backend)
  if not isinstance(w, (PackedWeight, PreparedWeight)):
    raise TypeError(f"quantized_matmul takes a PackedWeight or PreparedWeight, not "
                    f"{type(w).__name__} (dequantize a QuantizedWeight, or .pack() it)")
  k, n = w.shape
  if x.shape[-1] != k:
    raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) but the weight takes "
                     f"in_features={k} (weight shape {k}x{n})")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x has dtype {x.dtype}: quantized_matmul takes floating-point activations")
  mode = "runtime"
  if isinstance(w, PackedWeight):
    if not isinstance(w.g_idx, jax.core.Tracer):
      mode = "natural" if is_natural(w.g_idx, w.group_size) else "act_order"
      if mode == "act_order":
        _log_once(logging.WARNING, "gptq_jax: an act-order PackedWeight (non-monotone g_idx) runs "
                  "on the XLA gather path; call prepare_for_kernel(w) once at load to use the "
                  "kernel")
    else:
      _log_once(logging.INFO, "gptq_jax: PackedWeight with a traced g_idx: act-order is checked at "
                "run time (lax.cond); prepare_for_kernel(w) at load avoids the check and the "
                "per-call zero unpacking")
  # the TPU generation is static: lowering for another one (block_sizes.for_generation) traces anew
  return _quantized_matmul(x, w, backend, mode, block_sizes.tpu_generation())

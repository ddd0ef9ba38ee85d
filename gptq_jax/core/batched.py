"""GPTQ for a batch of same-shape linear layers with their own Hessians: a layer's experts.

The experts of a mixture-of-experts layer all have the same shapes, each its own Hessian (from
the tokens routed to it). ``quantize_batched`` solves them together: the steps of
``quantize_weight`` (dead columns and column order, the grids, the scanned column loop, the final
reordering) run once, ``jax.vmap``-ed over the experts, so one compiled program serves a whole
layer; its codes are those of one ``quantize_weight`` per expert
(``tests/core/batched_test.py``). Kernels that share each expert's Hessian (its gate and up
projections) are concatenated along their outputs first, as ``core.shared`` does for one layer.

* Factorization: expert by expert with ``factor.factorize`` (the same program, damping
  escalation and LAPACK thread limit as ``quantize_weight``; a vmapped Cholesky under that limit
  deadlocks XLA:CPU); everything after it is vmapped.
* ``rtn``: experts marked there (too few calibration tokens; see pipeline/experts.py) get
  round-to-nearest instead (their Hessian is replaced by the identity in the batch, so the batch
  keeps its shape; the result is then RTN's).
* Memory: experts go through in chunks of at most ``chunk`` (the last chunk padded with identity
  problems, so one program serves every chunk); with a ``mesh`` each chunk's experts are split
  over its devices (``jax.shard_map``; no collective: experts never mix).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptq_jax.config import GPTQConfig
from gptq_jax.core import factor, gptq, shared
from gptq_jax.core.weights import QuantizedWeight

DEFAULT_CHUNK_BYTES = 1 << 30  # float32 bytes of one chunk's per-expert buffers (W, H, U, ...)


@functools.partial(jax.jit, static_argnums=2)
def _prepare_all(kernel, H, st):
  return jax.vmap(lambda k, h: gptq._prepare(k, h, st))(kernel, H)


@functools.partial(jax.jit, static_argnums=4)
def _solve_all(kernel, H, Wp, U, st, perm):
  """Grids, column loop and reordering for every expert -> (codes, scales, zeros, g_idx, loss)."""
  def one(k, h, w, u, p):
    col_weight = None
    if st.group_size == -1 or st.static_groups:
      col_weight = st.clip_weight(jnp.diag(u)[jnp.argsort(p)])
    grids0, sgrids = gptq._fixed_grids(k, h, st, col_weight)
    q, s, z, loss = gptq._gptq_blocks(w, u, p, grids0, sgrids, st)
    return gptq._assemble(q, s, z, p, sgrids, st) + (loss,)
  return jax.vmap(one)(kernel, H, Wp, U, perm)


@functools.lru_cache(maxsize=16)
def _spread_solve(mesh: Mesh, st):
  e = P("experts")
  return jax.jit(jax.shard_map(lambda *a: _solve_all(*a[:4], st, a[4]), mesh=mesh,
                               in_specs=(e,) * 5, out_specs=(e,) * 5, check_vma=False))


def _factor(Hp, cfg: GPTQConfig, names: Sequence[str]):
  """U for every expert, by ``factor.factorize`` one expert at a time (the program, thread limits
  and damping escalation of ``quantize_weight``: the same U bit for bit; a vmapped Cholesky under
  the one-BLAS-thread limit deadlocks XLA:CPU), each expert's damping, and those that failed
  (identity U in their place: RTN replaces their result)."""
  Us, damps, failed = [], [], []
  for e in range(Hp.shape[0]):
    U, damp = factor.factorize(Hp[e], cfg, names[e])
    if U is None:
      failed.append(e)
      U = jnp.eye(Hp.shape[-1], dtype=Hp.dtype)
    Us.append(U)
    damps.append(damp)
  return jnp.stack(Us), damps, failed


def _solve_chunk(kernel, H, cfg: GPTQConfig, names, mesh):
  """One chunk of experts: kernel [c, in, out], H [c, in, in] -> (codes, scales, zeros, g_idx,
  loss [c, out]) as NumPy, each expert's damping, and the experts that fell back to RTN."""
  st = gptq._static_of(cfg)
  Wp, Hp, _, perm = _prepare_all(kernel, H, st)
  U, damps, failed = _factor(Hp, cfg, names)
  del Hp
  m = shared._rows_mesh(mesh, kernel.shape[0], "experts")
  if m is None:
    out = _solve_all(kernel, H, Wp, U, st, perm)
  else:
    put = lambda x: jax.device_put(x, NamedSharding(m, P("experts")))  # noqa: E731
    out = _spread_solve(m, st)(*(put(x) for x in (kernel, H, Wp, U, perm)))
  return [np.asarray(x) for x in out], damps, failed


def _chunk_size(in_features: int, out_features: int, n: int, budget: int) -> int:
  per_expert = 4 * (4 * in_features * in_features + 3 * in_features * out_features)
  return max(1, min(n, budget // max(1, per_expert)))


def quantize_batched(kernels: Sequence, hessians, cfg: GPTQConfig, names: Sequence[str] = (),
                     *, rtn: Sequence[bool] | None = None, mesh: Mesh | None = None,
                     chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                     on_chunk: Callable[[int], None] | None = None
                     ) -> list[tuple[QuantizedWeight, list[gptq.GPTQInfo]]]:
  """GPTQ-quantize E experts' kernels at once.

  Args:
    kernels: one or more ``[E, in, out_k]`` arrays (Flax layout, experts stacked) whose expert
      ``e`` reads the input whose Hessian is ``hessians[e]``.
    hessians: ``[E, in, in]``, each expert's ``X^T X`` at any positive scale.
    names: one name per expert (warnings).
    rtn: per expert, True = round-to-nearest instead of GPTQ (``info.fallback``; loss NaN).
    mesh: split each chunk's experts over these devices (``core.shared.solve_mesh``).
    chunk_bytes: float32 bytes of the per-expert buffers solved at once.
    on_chunk: called with the number of experts done after each chunk (progress).

  Returns:
    per kernel, (stacked ``QuantizedWeight`` ``[E, ...]``, one ``GPTQInfo`` per expert) — each
    expert's codes those of ``quantize_weight(kernels[k][e], hessians[e], cfg)``.
  """
  if not gptq_can_batch(cfg):
    raise ValueError("GPTAQ needs each layer's own cross-term: quantize experts one by one")
  kernels = [jnp.asarray(k, jnp.float32) for k in kernels]
  widths = [int(k.shape[2]) for k in kernels]
  kernel = jnp.concatenate(kernels, axis=2)  # [E, in, sum out_k]
  H = jnp.asarray(hessians, jnp.float32)
  E, k_in, _ = kernel.shape
  names = list(names) or [f"expert{e}" for e in range(E)]
  rtn = np.zeros(E, bool) if rtn is None else np.asarray(rtn, bool)
  _validate(kernel, H, rtn)
  H = jnp.where(jnp.asarray(rtn)[:, None, None], jnp.eye(k_in, dtype=H.dtype), H)
  c = _chunk_size(k_in, kernel.shape[2], E, chunk_bytes)
  pad = -E % c
  if pad:  # identity problems fill the last chunk: one compiled program for every chunk
    kernel = jnp.concatenate([kernel, jnp.zeros((pad,) + kernel.shape[1:], kernel.dtype)])
    H = jnp.concatenate([H, jnp.broadcast_to(jnp.eye(k_in, dtype=H.dtype), (pad, k_in, k_in))])
  parts, damps, failed = [], [], set(np.flatnonzero(rtn).tolist())
  for start in range(0, E + pad, c):
    chunk_names = (names + [f"padding{j}" for j in range(pad)])[start:start + c]
    out, d, f = _solve_chunk(kernel[start:start + c], H[start:start + c], cfg, chunk_names, mesh)
    parts.append(out)
    damps += d
    failed |= {start + e for e in f}
    if on_chunk is not None:
      on_chunk(min(E, start + c))
  codes, scales, zeros, g_idx, loss = (np.concatenate([p[j] for p in parts])[:E] for j in range(5))
  return _split(kernel[:E], codes, scales, zeros, g_idx, loss, widths, cfg, damps, sorted(failed))


@jax.jit
def _nonfinite_per_expert(kernel, H):
  bad = lambda a: jnp.sum(~jnp.isfinite(a), axis=tuple(range(1, a.ndim)))  # noqa: E731
  return bad(kernel) + bad(H)


def _validate(kernel, H, rtn) -> None:
  E, k_in, _ = kernel.shape
  if H.shape != (E, k_in, k_in):
    raise ValueError(f"hessians must be [E, in, in] = [{E}, {k_in}, {k_in}] for kernels of shape "
                     f"{tuple(kernel.shape)}, got {tuple(H.shape)}")
  bad = np.asarray(_nonfinite_per_expert(kernel, H)) * ~rtn
  if bad.any():
    raise ValueError(f"expert {int(np.argmax(bad > 0))} has {int(bad.max())} NaN/Inf value(s) in "
                     "its kernel or Hessian; GPTQ needs finite weights and Hessians")


def gptq_can_batch(cfg: GPTQConfig) -> bool:
  return not cfg.gptaq


def _split(kernel, codes, scales, zeros, g_idx, loss, widths, cfg, damps, failed):
  """Per kernel: the stacked QuantizedWeight and per-expert infos; RTN for ``failed`` experts."""
  out, start = [], 0
  for w in widths:
    cut = slice(start, start + w)
    c, s, z = codes[:, :, cut].copy(), scales[:, :, cut].copy(), zeros[:, :, cut].copy()
    gi = g_idx.copy()
    infos = []
    for e in range(codes.shape[0]):
      if e in failed:
        r = gptq.rtn_quantize(kernel[e, :, cut], cfg)
        c[e], s[e], z[e], gi[e] = (np.asarray(a) for a in (r.codes, r.scales, r.zeros, r.g_idx))
        infos.append(gptq.GPTQInfo(loss=float("nan"), damp=damps[e], fallback=True))
      else:
        infos.append(gptq.GPTQInfo(loss=float(loss[e, cut].sum()), damp=damps[e],
                                   fallback=False))
    qw = QuantizedWeight(codes=jnp.asarray(c), scales=jnp.asarray(s), zeros=jnp.asarray(z),
                         g_idx=jnp.asarray(gi), bits=cfg.bits, group_size=cfg.group_size)
    out.append((qw, infos))
    start += w
  return out

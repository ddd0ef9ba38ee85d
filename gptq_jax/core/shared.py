"""GPTQ for several linear layers that share one Hessian (q/k/v, gate/up): one solve for all.

GPTQ's rows (output features) are independent given H: every step of the column loop acts on each
row separately, and everything that depends on H alone (dead columns, the act-order / GAR
permutation, the damping, the inverse-Hessian factor ``U``, the Hessian-weighted clipping search)
is the same for every layer that reads the same input. So the kernels are concatenated along their
output axis, H is factorized once, one column loop quantizes all rows, and the result is split
back into one ``QuantizedWeight`` per layer — with exactly the codes of separate solves, for about
a third of the factorization work and one compiled call instead of three.

With a ``mesh`` the column loop is spread over devices: its rows (the concatenated outputs) are
split over a ``"rows"`` axis with ``jax.shard_map`` (H's factor and the permutation replicated;
no collective is needed, as no step mixes rows), over the largest number of the mesh's devices that
divides the rows. The codes are those of one solve on one device (``tests/core/shared_test.py``).

``quantize_weight``'s contract is unchanged; this is an addition beside it.
"""

from __future__ import annotations

import functools
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptq_jax.config import GPTQConfig
from gptq_jax.core import factor, gptq
from gptq_jax.core.weights import QuantizedWeight


def can_share(cfg: GPTQConfig) -> bool:
  """False for settings whose solve depends on more than H and the weights (per-layer then)."""
  return not getattr(cfg, "gptaq", None)


def solve_mesh(spread: str | Mesh | None = "auto") -> Mesh | None:
  """The devices a solve is spread over: ``"auto"`` (this process's devices when there are several
  and they are TPUs or GPUs; on CPU the devices share the host's cores and the split costs more
  than it gives, see docs/scale.md), ``"on"`` (this process's devices, any platform), ``"off"`` /
  None, or a ``Mesh`` with a ``"rows"`` axis."""
  if isinstance(spread, Mesh) or spread in (None, "off"):
    return spread if isinstance(spread, Mesh) else None
  if spread not in ("auto", "on"):
    raise ValueError(f"spread={spread!r}: one of 'auto', 'on', 'off' or a Mesh")
  devices = jax.local_devices()
  if len(devices) < 2 or (spread == "auto" and devices[0].platform == "cpu"):
    return None
  return Mesh(np.array(devices), ("rows",))


def _rows_mesh(mesh: Mesh | None, rows: int, axis: str = "rows") -> Mesh | None:
  """The first d devices of ``mesh``, d the largest divisor of ``rows`` it has, on one axis named
  ``axis`` (None: d < 2)."""
  if mesh is None:
    return None
  devices = list(mesh.devices.flat)
  d = max(k for k in range(1, len(devices) + 1) if rows % k == 0)
  return Mesh(np.array(devices[:d]), (axis,)) if d > 1 else None


@functools.lru_cache(maxsize=32)
def _spread_loop(mesh: Mesh, st):
  r = P(None, "rows")
  loop = lambda W, U, perm, g0, sg: gptq._gptq_blocks(W, U, perm, g0, sg, st)  # noqa: E731
  # no collective: rows never mix (check_vma off: the loop makes its carries from constants)
  return jax.jit(jax.shard_map(loop, mesh=mesh, in_specs=(r, P(), P(), P("rows"), r),
                               out_specs=(r, r, r, P("rows")), check_vma=False))


def _column_loop(Wp, U, perm, grids0, sgrids, st, mesh: Mesh | None):
  """``gptq._gptq_blocks``, its rows split over ``mesh`` when given; results on U's device."""
  mesh = _rows_mesh(mesh, int(Wp.shape[1]))
  if mesh is None:
    return gptq._gptq_blocks(Wp, U, perm, grids0, sgrids, st)
  put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))  # noqa: E731
  home = next(iter(U.devices()))
  out = _spread_loop(mesh, st)(put(Wp, None, "rows"), put(U), put(perm),
                               tuple(put(g, "rows") for g in grids0),
                               tuple(put(g, None, "rows") for g in sgrids))
  return jax.device_put(out, home)


def quantize_shared(kernels: Sequence, hessian, cfg: GPTQConfig, names: Sequence[str] = (),
                    mesh: Mesh | None = None) -> list[tuple[QuantizedWeight, gptq.GPTQInfo]]:
  """GPTQ-quantize ``kernels`` (each ``[in, out_k]``, Flax layout) that share ``hessian``.

  Returns one ``(QuantizedWeight, GPTQInfo)`` per kernel, equal to ``quantize_weight(kernel,
  hessian, cfg, return_info=True)`` for each (the loss is each layer's own rows' loss).
  ``mesh`` (``solve_mesh()``): spread the column loop's rows over its devices (a single kernel
  too).
  """
  names = list(names) or [f"layer{k}" for k in range(len(kernels))]
  if (len(kernels) == 1 and mesh is None) or not can_share(cfg):
    return [gptq.quantize_weight(k, hessian, cfg, return_info=True, name=n)
            for k, n in zip(kernels, names)]
  kernels = [jnp.asarray(k) for k in kernels]
  widths = [int(k.shape[1]) for k in kernels]
  if len({int(k.shape[0]) for k in kernels}) != 1:
    raise ValueError(f"kernels sharing a Hessian must have the same input size, got shapes "
                     f"{[tuple(k.shape) for k in kernels]}")
  kernel = jnp.concatenate([k.astype(jnp.float32) for k in kernels], axis=1)  # [in, sum out_k]
  hessian = jnp.asarray(hessian)
  gptq._validate(kernel, hessian)
  joint = "+".join(names)
  st = gptq._static_of(cfg)
  prepared = gptq._prepare(kernel, hessian, st)  # (Wp, Hp[, cross], perm)
  Wp, perm = prepared[0], prepared[-1]
  Hp = prepared[1]
  del prepared  # Hp is donated to the factorization (made again only for a damping retry)
  U, damp = factor.factorize(Hp, cfg, joint, rebuild=lambda: gptq._prepare(kernel, hessian, st)[1])
  del Hp
  if U is None:
    warnings.warn(f"GPTQ {joint}: the Hessian is not positive definite for any damp_percent < 1; "
                  "these layers fall back to round-to-nearest", UserWarning, stacklevel=2)
    info = gptq.GPTQInfo(loss=float("nan"), damp=damp, fallback=True)
    return [(gptq.rtn_quantize(k, cfg), info) for k in kernels]
  col_weight = None
  if st.group_size == -1 or st.static_groups:
    col_weight = st.clip_weight(jnp.diag(U)[jnp.argsort(perm)])
  grids0, sgrids = gptq._fixed_grids(kernel, hessian, st, col_weight)
  q, s, z, loss = _column_loop(Wp, U, perm, grids0, sgrids, st, mesh)
  codes, scales, zeros, g_idx = gptq._assemble(q, s, z, perm, sgrids, st)
  row_loss = np.asarray(loss, np.float64)  # [sum out_k]: the one host sync of the solve
  out, start = [], 0
  for w in widths:
    cut = slice(start, start + w)
    qw = QuantizedWeight(codes=codes[:, cut], scales=scales[:, cut], zeros=zeros[:, cut],
                         g_idx=g_idx, bits=cfg.bits, group_size=cfg.group_size)
    out.append((qw, gptq.GPTQInfo(loss=float(row_loss[cut].sum()), damp=damp, fallback=False)))
    start += w
  return out

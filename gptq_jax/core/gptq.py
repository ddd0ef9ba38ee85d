"""GPTQ for one linear layer (Frantar et al., 2022, https://arxiv.org/abs/2210.17323).

``quantize_weight(kernel, hessian, cfg)`` is the reference ``fasterquant`` (docs/algorithm.md): dead
columns, static groups, act-order or group-aware reordering (GAR), relative damping with automatic
escalation, the upper Cholesky factor of ``H^-1``, and the lazy block update. Notation follows the
paper with the references' ``W = kernel.T`` (rows = outputs, columns = inputs); we store W
transposed, i.e. in the Flax kernel layout ``Wt: [columns, rows]``, so "column i" is ``Wt[i]``.

The column loop is a ``lax.fori_loop`` inside a ``lax.scan`` over blocks of ``block_size`` columns:
the trace does not grow with the width and each (shape, config) compiles once. Blocks have a fixed
shape: the columns are padded to a multiple of the block size with zero weights and an identity
Hessian, which quantize exactly to 0 with zero error. The lazy update ``W[:, i2:] -= Err1 @
Hinv[i1:i2, i2:]`` is applied to all columns (the upper-triangular factor makes it exact for the
columns before the block; the block's own columns are never read again).

Group grids are fitted, as in the reference, on the *global* W, which only receives updates at block
boundaries: every group that starts inside a block is therefore fitted at the block's start.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gptq_jax.config import GPTQConfig
from gptq_jax.core import gptaq, quantizer
from gptq_jax.core.factor import factorize
from gptq_jax.core.weights import QuantizedWeight

HIGHEST = jax.lax.Precision.HIGHEST
_SUB = 16  # columns per rank-1-update sub-block inside a block (the rest of the block: a matmul)


class GPTQInfo(NamedTuple):
  """What ``quantize_weight(..., return_info=True)`` reports beside the weight."""

  loss: float  # the reference's loss: sum of (w - q)^2 / Hinv[i, i]^2 / 2 (NaN after RTN fallback)
  damp: float  # the damp_percent that made H factorizable (after escalation)
  fallback: bool  # True when no damping < 1 worked and round-to-nearest was used instead


class _Static(NamedTuple):
  bits: int
  group_size: int
  sym: bool
  static_groups: bool
  order: str  # "natural", "desc" (act-order) or "gar"
  block_size: int
  min_zero: int
  mse: float
  mse_weight: str  # "none" or "hessian"

  def fit(self, x, weight=None):
    return quantizer.fit_grid(x, bits=self.bits, sym=self.sym, min_zero=self.min_zero,
                              mse=self.mse, weight=weight)

  def clip_weight(self, u_diag):
    """Per-column weights of the clipping search: ``U_jj ** -mse`` with ``mse_weight="hessian"``
    (the search then minimises ``sum |(q - x) / U_jj| ** mse``, the error GPTQ's column loop
    charges each column), else None (the references' plain ``sum |q - x| ** mse``)."""
    if not self.mse or self.mse_weight != "hessian":
      return None
    return u_diag ** -self.mse


def _static_of(cfg: GPTQConfig) -> _Static:
  order = "desc" if cfg.desc_act else ("gar" if cfg.act_group_aware else "natural")
  return _Static(cfg.bits, cfg.group_size, cfg.sym, cfg.static_groups, order, cfg.block_size,
                 cfg.min_zero, float(cfg.mse), cfg.mse_weight)


def gar_permutation(diag, group_size: int):
  """Group-aware reordering: sort inside each full group by ``diag`` (descending), order the full
  groups by their largest ``diag`` (descending, stable); a partial last group stays at the end."""
  cols = diag.shape[0]
  full = cols // group_size
  if full == 0:
    return jnp.arange(cols)
  d = diag[: full * group_size].reshape(full, group_size)
  local = jnp.argsort(-d, axis=1, stable=True)  # [full, gs]
  score = jnp.take_along_axis(d, local[:, :1], axis=1)[:, 0]  # each group's max
  order = jnp.argsort(-score, stable=True)
  perm = (local + group_size * jnp.arange(full)[:, None])[order].reshape(-1)
  return jnp.concatenate([perm, jnp.arange(full * group_size, cols)])


@functools.partial(jax.jit, static_argnums=2)
def _prepare(kernel, H, st: _Static, cross=None):
  """Dead columns and the column order. Returns the permuted Wt, H and cross-term (None without
  GPTAQ), and the permutation."""
  Wt = kernel.astype(jnp.float32)  # [cols, rows]
  H = H.astype(jnp.float32)
  cols = Wt.shape[0]
  dead = jnp.diag(H) == 0
  H = H + jnp.diag(dead.astype(jnp.float32))
  Wt = jnp.where(dead[:, None], 0.0, Wt)
  diag = jnp.diag(H)
  if st.order == "desc":
    perm = jnp.argsort(-diag, stable=True)
  elif st.order == "gar":
    perm = gar_permutation(diag, st.group_size)
  else:
    perm = jnp.arange(cols)
  if cross is not None:  # GPTAQ's dXXT, in the same order
    cross = gptaq.permute(cross, dead, perm)
  return Wt[perm], H[perm][:, perm], cross, perm


@functools.partial(jax.jit, static_argnums=2)
def _fixed_grids(kernel, H, st: _Static, col_weight=None):
  """The grids fitted before the column loop: one per row with ``group_size=-1`` (on W before the
  dead-column fix, as in the reference) and one per static group; unused zeros otherwise.
  ``col_weight [cols]`` (natural order) weighs the clipping search's per-column errors."""
  Wt = kernel.astype(jnp.float32)  # [cols, rows]
  cols, rows = Wt.shape
  if st.group_size == -1:
    scale0, zero0 = st.fit(Wt.T, col_weight)  # [rows]
  else:
    scale0 = zero0 = jnp.zeros((rows,), jnp.float32)  # unused: groups fit their own
  if not st.static_groups:
    return (scale0, zero0), (scale0[None], zero0[None])
  gs = st.group_size
  groups = -(-cols // gs)
  Wt = jnp.where((jnp.diag(H) == 0)[:, None], 0.0, Wt)
  Wg = jnp.pad(Wt, ((0, groups * gs - cols), (0, 0))).reshape(groups, gs, rows)
  if col_weight is not None:
    col_weight = jnp.pad(col_weight, (0, groups * gs - cols)).reshape(groups, 1, gs)
  return (scale0, zero0), st.fit(jnp.swapaxes(Wg, 1, 2), col_weight)  # [groups, rows]


def _column_grids(st: _Static, i1, Wt, u_diag, perm, carry, grids0, sgrids, cols: int):
  """(scale, zero) for each of the block's columns: ``[B, rows]`` each."""
  B, gs = st.block_size, st.group_size
  rows = Wt.shape[1]
  idx = i1 + jnp.arange(B)
  if gs == -1:
    return tuple(jnp.broadcast_to(g, (B, rows)) for g in grids0)
  if st.static_groups:
    g = jnp.take(perm, jnp.minimum(idx, cols - 1)) // gs
    return tuple(jnp.take(s, g, axis=0) for s in sgrids)
  nstarts = -(-B // gs)
  first = (i1 + gs - 1) // gs * gs
  starts = first + gs * jnp.arange(nstarts)

  def fit(s):
    w = st.clip_weight(jax.lax.dynamic_slice(u_diag, (s,), (gs,)))
    return st.fit(jax.lax.dynamic_slice(Wt, (s, 0), (gs, rows)).T, w)

  fits = jax.vmap(fit)(starts)  # ([nstarts, rows], [nstarts, rows])
  g0 = idx // gs * gs
  pick = jnp.where(g0 >= i1, (g0 - first) // gs + 1, 0)  # 0 = the group carried in
  return tuple(jnp.concatenate([c[None], f])[pick] for c, f in zip(carry, fits))


@functools.partial(jax.jit, static_argnums=5)
def _gptq_blocks(Wp, U, perm, grids0, sgrids, st: _Static, P=None):
  """The column loop. Returns the codes per processed column ``[cols, rows]``, the grid of each
  group ``[groups, rows]`` (scales, zeros; group ``g`` starts at processed column ``g *
  group_size``: only the group starts' grids are kept, not one per column) and the loss of each
  row ``[rows]`` (rows are independent: several layers sharing H can be solved as one).

  With GPTAQ's correction ``P``, the loop also applies the steps of ``core/gptaq.py``.

  Inside a block the rank-1 updates touch ``_SUB`` columns at a time and one matmul carries each
  sub-block's errors to the rest of the block; the lazy update ``W[:, i2:] -= Err1 @ U[i1:i2,
  i2:]`` runs over the columns after the block only, ``B`` at a time. Columns already quantized may
  receive updates too (their codes are recorded): harmless, and it keeps every shape static.
  """
  cols, rows = Wp.shape
  B, gs, maxq = st.block_size, st.group_size, 2**st.bits - 1
  nblocks = -(-cols // B)
  cp = nblocks * B
  slack = 2 * gs if gs > 0 else 0  # lets group slices near the end stay in bounds
  Wt = jnp.pad(Wp, ((0, cp - cols + slack), (0, 0)))
  Up = U if cp == cols else jnp.pad(U, ((0, cp - cols), (0, cp - cols))) + jnp.diag(
      (jnp.arange(cp) >= cols).astype(jnp.float32))  # no [cols, cols] copy when none is padded
  sub = _SUB if B % _SUB == 0 else B
  u_diag = jnp.pad(jnp.diag(Up), (0, slack), constant_values=1.0)  # [cp + slack]
  with_p = P is not None
  Pp = jnp.pad(P, ((0, cp - cols), (0, cp - cols))) if with_p else None
  gsx = cols if gs == -1 else gs  # processed columns 0, gsx, 2 gsx, ... start the groups
  groups, per_block = -(-cols // gsx), -(-B // gsx)  # at most per_block group starts per block

  def keep_group_grids(S, Z, i1, s_blk, z_blk):
    starts = (i1 + gsx - 1) // gsx * gsx + gsx * jnp.arange(per_block)
    g = jnp.where((starts < i1 + B) & (starts < cols), starts // gsx, groups)  # groups: dropped
    at = jnp.clip(starts - i1, 0, B - 1)
    return (S.at[g].set(s_blk[at], mode="drop"),
            Z.at[g].set(z_blk[at].astype(jnp.int32), mode="drop"))

  def block(carry, b):
    Wt, grid_carry, loss, S, Z = carry
    i1 = b * B
    s_blk, z_blk = _column_grids(st, i1, Wt, u_diag, perm, grid_carry, grids0, sgrids, cols)
    S, Z = keep_group_grids(S, Z, i1, s_blk, z_blk)
    W1 = jax.lax.dynamic_slice(Wt, (i1, 0), (B, rows))
    U1 = jax.lax.dynamic_slice(Up, (i1, i1), (B, B))
    P1 = jax.lax.dynamic_slice(Pp, (i1, i1), (B, B)) if with_p else None

    def subblock(j, state):
      W1, Q1, Err1, D1, loss = state
      k1 = j * sub
      Ws = jax.lax.dynamic_slice(W1, (k1, 0), (sub, rows))
      Us = jax.lax.dynamic_slice(U1, (k1, k1), (sub, sub))
      Ps = jax.lax.dynamic_slice(P1, (k1, k1), (sub, sub)) if with_p else None

      def column(i, state):
        Ws, Qs, Es, extra, loss = state
        w, s, z = Ws[i], s_blk[k1 + i], z_blk[k1 + i]
        q = quantizer.quantize_codes(w, s, z, maxq)
        dq = s * (q - z)
        d = Us[i, i]
        loss = loss + quantizer.true_divide((w - dq) ** 2, d**2) / 2  # [rows]: rows independent
        err1 = quantizer.true_divide(w - dq, d)
        Ws = Ws - Us[i][:, None] * err1[None, :]  # Us[i, :i] == 0: earlier columns unchanged
        if with_p:
          Ws, extra = gptaq.column_step(Ws, Ps[i], w, dq, extra, i)
        return Ws, Qs.at[i].set(q), Es.at[i].set(err1), extra, loss

      zeros = jnp.zeros((sub, rows), jnp.float32)
      extra = (zeros, zeros) if with_p else ()
      _, Qs, Es, extra, loss = jax.lax.fori_loop(0, sub, column, (Ws, zeros, zeros, extra, loss))
      Urow = jax.lax.dynamic_slice(U1, (k1, 0), (sub, B))  # zero left of the sub-block
      W1 = W1 - jnp.matmul(Urow.T, Es, precision=HIGHEST)
      if with_p:
        W1, D1 = gptaq.subblock_step(W1, P1, k1, extra, D1)
      Q1 = jax.lax.dynamic_update_slice(Q1, Qs, (k1, 0))
      Err1 = jax.lax.dynamic_update_slice(Err1, Es, (k1, 0))
      return W1, Q1, Err1, D1, loss

    zeros = jnp.zeros((B, rows), jnp.float32)
    D1 = zeros if with_p else jnp.zeros((), jnp.float32)
    _, Q1, Err1, D1, loss = jax.lax.fori_loop(0, B // sub, subblock,
                                              (W1, zeros, zeros, D1, loss))

    def lazy(c, Wt):  # W[:, i2:] -= Err1 @ U[i1:i2, i2:], one B-column chunk at a time
      j = (b + 1 + c) * B
      Uc = jax.lax.dynamic_slice(Up, (i1, j), (B, B))
      Wc = jax.lax.dynamic_slice(Wt, (j, 0), (B, rows))
      Wc = Wc - jnp.matmul(Uc.T, Err1, precision=HIGHEST)
      if with_p:
        Wc = gptaq.lazy_step(Wc, Pp, i1, j, D1)
      return jax.lax.dynamic_update_slice(Wt, Wc, (j, 0))

    Wt = jax.lax.fori_loop(0, nblocks - 1 - b, lazy, Wt)
    return (Wt, (s_blk[-1], z_blk[-1]), loss, S, Z), Q1.astype(jnp.uint8)

  init = (Wt, grids0, jnp.zeros((rows,), jnp.float32), jnp.zeros((groups, rows), jnp.float32),
          jnp.zeros((groups, rows), jnp.int32))
  (_, _, loss, S, Z), q = jax.lax.scan(block, init, jnp.arange(nblocks))
  return q.reshape(cp, rows)[:cols], S, Z, loss


@functools.partial(jax.jit, static_argnums=5)
def _assemble(q, S, Z, perm, sgrids, st: _Static):
  """Undo the column order; put the grids of the processed groups (``S``, ``Z`` ``[groups,
  rows]``, from ``_gptq_blocks``) in the stored group order; build g_idx."""
  cols = q.shape[0]
  gs = cols if st.group_size == -1 else st.group_size
  groups = -(-cols // gs)
  inv = jnp.argsort(perm)
  codes = q[inv]
  natural_gidx = jnp.arange(cols, dtype=jnp.int32) // gs
  if st.static_groups:
    return codes, sgrids[0], sgrids[1].astype(jnp.int32), natural_gidx
  starts = jnp.arange(groups) * gs  # processed position of each group's first column
  if st.order == "gar":
    slot = perm[starts] // gs  # the natural group each processed group consists of
  else:
    slot = jnp.arange(groups)
  scales = jnp.zeros((groups, q.shape[1]), S.dtype).at[slot].set(S)
  zeros = jnp.zeros((groups, q.shape[1]), jnp.int32).at[slot].set(Z)
  g_idx = natural_gidx[inv] if st.order == "desc" else natural_gidx
  return codes, scales, zeros, g_idx


@jax.jit
def _count_nonfinite(a):
  return jnp.sum(~jnp.isfinite(a))


def _validate(kernel, hessian) -> None:
  if kernel.ndim != 2:
    raise ValueError(f"kernel must be 2-D [in, out] (Flax layout), got shape {kernel.shape}")
  k = kernel.shape[0]
  if hessian.shape != (k, k):
    raise ValueError(f"hessian must be [in, in] = [{k}, {k}] for a kernel of shape "
                     f"{kernel.shape}, got {hessian.shape}")
  for name, a in (("kernel", kernel), ("hessian", hessian)):
    bad = int(_count_nonfinite(a))
    if bad:
      raise ValueError(f"{name} has {bad} NaN/Inf value(s); GPTQ needs finite weights and a "
                       "finite Hessian (check the calibration activations for overflow)")


def quantize_weight(kernel, hessian, cfg: GPTQConfig, *, return_info: bool = False,
                    name: str = "layer", cross=None):
  """GPTQ-quantize one linear layer (GPTAQ when ``cfg.gptaq`` and ``cross`` is given).

  Args:
    kernel: ``[in, out]`` (Flax layout).
    hessian: ``[in, in]``, ``X^T X`` of the layer's inputs at any positive scale.
    cross: GPTAQ's ``dXXT = (X_float - X)^T X`` ``[in, in]`` at the same scale as ``hessian``
      (``core/hessian.py``); required when ``cfg.gptaq``, ignored otherwise.
    cfg: the settings (bits, group_size, sym, desc_act, act_group_aware, static_groups,
      damp_percent, damp_auto_increment, block_size, mse, mse_weight).
    return_info: also return a ``GPTQInfo`` (loss, damping used, fallback flag).
    name: used in warnings.

  Returns:
    ``QuantizedWeight`` (``.dequantize()`` is ``[in, out]`` in the original order), and the info.

  When no damping below 1 makes H factorizable (an indefinite H, not a Gram matrix), the layer falls
  back to round-to-nearest with a warning and ``info.fallback=True``: a usable result, never NaN.
  """
  kernel, hessian = jnp.asarray(kernel), jnp.asarray(hessian)
  _validate(kernel, hessian)
  cross = gptaq.check_cross(cfg, cross, hessian, name)  # None unless cfg.gptaq
  st = _static_of(cfg)
  Wp, Hp, Cp, perm = _prepare(kernel, hessian, st, cross)
  # Hp is consumed (donated) by the factorization; made again only if a damping retry needs it
  U, damp = factorize(Hp, cfg, name, rebuild=lambda: _prepare(kernel, hessian, st, cross)[1])
  del Hp
  if U is None:
    warnings.warn(f"GPTQ {name}: the Hessian is not positive definite for any damp_percent < 1 "
                  f"(tried {cfg.damp_percent} upward in steps of {cfg.damp_auto_increment}); "
                  "this layer falls back to round-to-nearest", UserWarning, stacklevel=2)
    qw = rtn_quantize(kernel, cfg)
    info = GPTQInfo(loss=float("nan"), damp=damp, fallback=True)
  else:
    col_weight = None
    if st.group_size == -1 or st.static_groups:  # fitted before the loop: weights in natural order
      col_weight = st.clip_weight(jnp.diag(U)[jnp.argsort(perm)])
    grids0, sgrids = _fixed_grids(kernel, hessian, st, col_weight)
    P = None if Cp is None else gptaq.correction(Cp, U, cfg.gptaq_alpha)
    q, s, z, loss = _gptq_blocks(Wp, U, perm, grids0, sgrids, st, P)
    codes, scales, zeros, g_idx = _assemble(q, s, z, perm, sgrids, st)
    qw = QuantizedWeight(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, bits=cfg.bits,
                         group_size=cfg.group_size)
    info = GPTQInfo(loss=float(jnp.sum(loss)), damp=damp, fallback=False)
  return (qw, info) if return_info else qw


def rtn_quantize(kernel, cfg: GPTQConfig) -> QuantizedWeight:
  """Round-to-nearest with the same grid (groups in natural order): the baseline GPTQ must beat."""
  kernel = jnp.asarray(kernel)
  codes, scales, zeros = quantizer.rtn_codes(
      kernel, bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, min_zero=cfg.min_zero,
      mse=float(cfg.mse))
  gs = kernel.shape[0] if cfg.group_size == -1 else cfg.group_size
  g_idx = jnp.arange(kernel.shape[0], dtype=jnp.int32) // gs
  return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, bits=cfg.bits,
                         group_size=cfg.group_size)

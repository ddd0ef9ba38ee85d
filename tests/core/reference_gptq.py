"""The test oracle: a plain NumPy (float32) port of the reference GPTQ, written from docs/algorithm.md.

Deliberately naive (Python loops over columns, the reference's W = kernel.T layout, a quantizer
object that is re-fitted in place) so it shares no structure with the JAX solver it checks.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


class Quantizer:

  def __init__(self, bits, sym, min_zero=0):
    self.maxq = F32(2**bits - 1)
    self.sym = sym
    self.min_zero = min_zero

  def find_params(self, x, mse=0.0, weight=None):  # x: [rows, n], weight: [n] or None
    x = x.astype(F32)
    tmp = np.zeros(x.shape[0], F32)
    xmin = np.minimum(x.min(1), tmp)
    xmax = np.maximum(x.max(1), tmp)
    if self.sym:
      xmax = np.maximum(np.abs(xmin), xmax)
      neg = xmin < 0
      xmin[neg] = -xmax[neg]
    both = (xmin == 0) & (xmax == 0)
    xmin[both] = -1
    xmax[both] = +1
    self._fit_range(xmin, xmax)
    if mse:
      self._search(x, xmin, xmax, mse, np.ones(x.shape[1]) if weight is None else weight)
    return self

  def _fit_range(self, xmin, xmax):
    self.scale = ((xmax - xmin) / self.maxq).astype(F32)
    if self.sym:
      self.zero = np.full_like(self.scale, (self.maxq + 1) / 2)
    else:
      self.zero = np.clip(np.round(-xmin / self.scale), self.min_zero, self.maxq).astype(F32)

  def _search(self, x, xmin, xmax, norm, weight, grid=100, maxshrink=0.8):
    """The clipping search: shrink the range by p = 1 - i / grid, keep each row's first best
    ``sum_j weight_j |q_j - x_j| ** norm``."""
    best = np.full(x.shape[0], np.inf)
    cand = Quantizer(1, self.sym, self.min_zero)
    cand.maxq = self.maxq
    for i in range(int(maxshrink * grid)):
      p = F32(1 - i / grid)
      cand._fit_range(p * xmin, p * xmax)
      if self.sym:
        cand.zero = self.zero  # the symmetric zero is the same for every candidate
      q = np.clip(np.round(x / cand.scale[:, None]) + cand.zero[:, None], 0, self.maxq)
      err = np.sum(np.abs(cand.scale[:, None] * (q - cand.zero[:, None]) - x).astype(np.float64)
                   ** norm * weight, axis=1)
      better = err < best
      best = np.where(better, err, best)
      self.scale = np.where(better, cand.scale, self.scale).astype(F32)
      self.zero = np.where(better, cand.zero, self.zero).astype(F32)

  def codes(self, w):  # w: [rows]
    return np.clip(np.round(w / self.scale) + self.zero, 0, self.maxq).astype(F32)

  def quantize(self, w):
    return (self.scale * (self.codes(w) - self.zero)).astype(F32)


def gar_perm(diag, gs):
  n = diag.shape[0]
  full = n // gs
  groups = []
  for g in range(full):
    idx = np.arange(g * gs, (g + 1) * gs)
    local = idx[np.argsort(-diag[idx], kind="stable")]
    groups.append((diag[local[0]], g, local))
  groups.sort(key=lambda t: -t[0])  # Python's sort is stable
  perm = [c for _, _, local in groups for c in local]
  return np.array(perm + list(range(full * gs, n)), dtype=np.int64)


def prepare(kernel, H, group_size, percdamp, actorder, gar):
  """Steps 2-6 of the reference: dead columns, the column order (act-order or GAR), damping and the
  upper factor U of the damped inverse Hessian. -> (W permuted [out, in], W_raw (natural, before
  the dead-column fix), dead mask, perm, U)."""
  W = np.array(kernel, F32).T.copy()  # [rows=out, cols=in]
  H = np.array(H, F32).copy()
  cols = W.shape[1]
  W_raw = W.copy()
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  perm = np.arange(cols)
  if actorder:
    perm = np.argsort(-np.diag(H), kind="stable")
  elif gar:
    perm = gar_perm(np.diag(H).copy(), group_size)
  W = W[:, perm]
  H = H[perm][:, perm]
  H[np.arange(cols), np.arange(cols)] += F32(percdamp) * np.mean(np.diag(H))
  L = np.linalg.cholesky(H).astype(F32)
  Linv = np.linalg.inv(L).astype(F32)
  U = np.linalg.cholesky((Linv.T @ Linv).astype(F32)).T.astype(F32)  # upper: Hinv = U^T U
  return W, W_raw, dead, perm, U


def fasterquant(kernel, H, *, bits, group_size=128, sym=True, percdamp=0.1, blocksize=128,
                actorder=False, static_groups=False, gar=False, min_zero=0, mse=0.0,
                mse_weight="none"):
  """Returns (codes [out, in], scale [groups, out], zero [groups, out], g_idx [in], loss).

  ``mse``: the clipping search's norm (0 = off). ``mse_weight="hessian"`` weighs each column's
  search error by ``U_jj ** -mse`` (U: the upper factor of the damped, permuted H^-1), so the
  grids fitted before the loop (group_size -1, static groups) are fitted once U is known.
  """
  W, W_raw, dead, perm, U = prepare(kernel, H, group_size, percdamp, actorder, gar)
  rows, cols = W.shape
  gs = group_size
  weight = np.diag(U).astype(np.float64) ** -mse if mse_weight == "hessian" else np.ones(cols)
  nat_weight = weight[np.argsort(perm)]  # the same weights, indexed by natural column
  quant = Quantizer(bits, sym, min_zero)
  if group_size == -1:
    quant.find_params(W_raw, mse, nat_weight)
  if static_groups:
    Wn = W[:, np.argsort(perm)]  # natural order, after the dead-column fix
    groups = [Quantizer(bits, sym, min_zero).find_params(Wn[:, i:i + gs], mse, nat_weight[i:i + gs])
              for i in range(0, cols, gs)]

  Q = np.zeros_like(W)
  used = [None] * cols  # the quantizer (scale, zero) used for each processed column
  loss = F32(0)
  for i1 in range(0, cols, blocksize):
    i2 = min(i1 + blocksize, cols)
    W1 = W[:, i1:i2].copy()
    Err1 = np.zeros_like(W1)
    U1 = U[i1:i2, i1:i2]
    for i in range(i2 - i1):
      w = W1[:, i]
      d = U1[i, i]
      if gs != -1:
        if static_groups:
          quant = groups[perm[i1 + i] // gs]
        elif (i1 + i) % gs == 0:
          quant = Quantizer(bits, sym, min_zero).find_params(
              W[:, i1 + i:i1 + i + gs], mse, weight[i1 + i:i1 + i + gs])
      Q[:, i1 + i] = quant.codes(w)
      used[i1 + i] = (quant.scale, quant.zero)
      q = quant.quantize(w)
      loss += np.sum((w - q)**2 / d**2) / 2
      err1 = (w - q) / d
      W1[:, i:] -= np.outer(err1, U1[i, i:]).astype(F32)
      Err1[:, i] = err1
    W[:, i2:] -= (Err1 @ U[i1:i2, i2:]).astype(F32)

  return (*assemble(Q, used, perm, cols, rows, gs, actorder, static_groups), float(loss))


def assemble(Q, used, perm, cols, rows, gs, actorder, static_groups):
  """Processed-order codes ``Q [rows, cols]`` and per-column grids ``used`` -> (codes in the
  original column order, scale, zero ``[groups, rows]``, g_idx)."""
  inv = np.argsort(perm)
  codes = Q[:, inv]
  gsz = cols if gs == -1 else gs
  ngroups = -(-cols // gsz)
  scale = np.zeros((ngroups, rows), F32)
  zero = np.zeros((ngroups, rows), F32)
  g_idx = np.zeros(cols, np.int64)
  for j in range(cols):  # j: processed position
    col = perm[j]
    if static_groups or not actorder:
      g = col // gsz
    else:
      g = j // gsz
    g_idx[col] = g
    scale[g], zero[g] = used[j]
  return codes, scale, zero, g_idx


def dequantize(codes, scale, zero, g_idx):
  """[out, in] codes -> [in, out] kernel."""
  return (scale[g_idx] * (codes.T - zero[g_idx])).astype(F32)

"""The GPTAQ test oracle: a plain NumPy (float32) port of the published GPTAQ update, in the style of
``reference_gptq.py`` (naive column loop, the reference's W = kernel.T layout).

GPTAQ (arXiv:2504.02692; GPTQModel 7.7 ``quantization/gptaq.py``) keeps ``dXXT = (X_float - X)^T
X`` beside ``H = X^T X``, forms ``P = alpha * triu(dXXT @ U^T, 1) @ U`` from the upper factor ``U``
of ``H^-1``, and in the column loop subtracts ``err_i U[i, i:] - w_i P[i, i:]`` (``w_i``: the
column before quantization); the lazy update subtracts ``Err1 @ U[i1:i2, i2:] - W1 @ P[i1:i2,
i2:]`` with ``W1`` the block after its updates (its quantized values). GPTQModel's GPTAQ has no
group-aware reordering; here GAR permutes ``dXXT`` like ``H`` (our extension).
"""

from __future__ import annotations

import numpy as np

from tests.core.reference_gptq import F32, Quantizer, assemble, prepare


def fasterquant_gptaq(kernel, H, dXXT, *, bits, alpha=0.25, group_size=128, sym=True,
                      percdamp=0.1, blocksize=128, actorder=False, static_groups=False, gar=False,
                      mse=0.0):
  """Returns (codes [out, in], scale [groups, out], zero [groups, out], g_idx [in], loss)."""
  W, W_raw, dead, perm, U = prepare(kernel, H, group_size, percdamp, actorder, gar)
  rows, cols = W.shape
  gs = group_size
  D = np.array(dXXT, F32).copy()
  D[:, dead] = 0
  D = D[perm][:, perm]
  P = (F32(alpha) * np.triu(D @ U.T, 1) @ U).astype(F32)
  quant = Quantizer(bits, sym)
  if group_size == -1:
    quant.find_params(W_raw, mse)
  if static_groups:
    Wn = W[:, np.argsort(perm)]
    groups = [Quantizer(bits, sym).find_params(Wn[:, i:i + gs], mse) for i in range(0, cols, gs)]

  Q = np.zeros_like(W)
  used = [None] * cols
  loss = F32(0)
  for i1 in range(0, cols, blocksize):
    i2 = min(i1 + blocksize, cols)
    W1 = W[:, i1:i2].copy()
    Err1 = np.zeros_like(W1)
    U1, P1 = U[i1:i2, i1:i2], P[i1:i2, i1:i2]
    for i in range(i2 - i1):
      w = W1[:, i].copy()
      d = U1[i, i]
      if gs != -1:
        if static_groups:
          quant = groups[perm[i1 + i] // gs]
        elif (i1 + i) % gs == 0:
          quant = Quantizer(bits, sym).find_params(W[:, i1 + i:i1 + i + gs], mse)
      Q[:, i1 + i] = quant.codes(w)
      used[i1 + i] = (quant.scale, quant.zero)
      q = quant.quantize(w)
      loss += np.sum((w - q)**2 / d**2) / 2
      err1 = (w - q) / d
      W1[:, i:] -= (np.outer(err1, U1[i, i:]) - np.outer(w, P1[i, i:])).astype(F32)
      Err1[:, i] = err1
    W[:, i2:] -= (Err1 @ U[i1:i2, i2:] - W1 @ P[i1:i2, i2:]).astype(F32)

  return (*assemble(Q, used, perm, cols, rows, gs, actorder, static_groups), float(loss))

"""Shared test data: correlated, heavy-tailed layer inputs and weights."""

from __future__ import annotations

import numpy as np


def layer_problem(seed=0, tokens=1024, k_in=320, n_out=96, outliers=4):
  """X [tokens, in] (Student-t, correlated, a few outlier channels), kernel [in, out], H."""
  rng = np.random.default_rng(seed)
  base = rng.standard_t(3, size=(tokens, k_in)).astype(np.float32)
  mix = np.eye(k_in, dtype=np.float32) + rng.normal(0, 0.4 / np.sqrt(k_in), (k_in, k_in)).astype(
      np.float32)
  X = base @ mix
  X[:, rng.choice(k_in, outliers, replace=False)] *= 8.0
  kernel = (rng.standard_t(4, size=(k_in, n_out)) * 0.05).astype(np.float32)
  H = (2.0 / tokens) * (X.T @ X)
  return X, kernel, H.astype(np.float32)


def output_error(X, kernel, deq):
  """||X (K - Q)||^2: the layer's output error on its calibration inputs."""
  d = X @ (np.asarray(kernel, np.float64) - np.asarray(deq, np.float64))
  return float(np.sum(d * d))

"""The ``--report`` of a quantization run: a JSON file and, beside it, a PNG of the loss per layer.

Mixture-of-experts layers report one record per expert (its loss, the calibration tokens routed
to it, whether it fell back to round-to-nearest); the plot draws each expert projection as one
line (the mean over its experts) inside a band (their min to max), and the legend says how many
experts fell back."""

from __future__ import annotations

import json
import math
import os
import re
import sys


def _clean(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None  # strict JSON: NaN (an RTN fallback's loss) becomes null
  if isinstance(x, dict):
    return {k: _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  return x


def write(path: str, result: dict) -> str | None:
  """Write the JSON report at ``path`` and the loss plot beside it; -> the PNG's path, or None
  when there is nothing to plot or matplotlib is not installed (a message says so)."""
  with open(path, "w") as f:
    json.dump(_clean(result), f, indent=2, sort_keys=True)
  layers = result.get("layers") or []
  if not layers:
    return None
  png = os.path.splitext(path)[0] + ".png"
  try:
    import matplotlib  # noqa: F401,PLC0415 (optional: pip install gptq_jax[plots])
  except ImportError:
    print(f"report: matplotlib is not installed, so no loss plot ({png}); "
          "pip install matplotlib to get one", file=sys.stderr)
    return None
  plot_losses(png, layers)
  return png


def loss_series(layers: list[dict]) -> tuple[dict[str, dict[int, list[float]]], dict[str, int]]:
  """({projection: {block: [losses]}}, {projection: experts that fell back}): a layer's own loss,
  or every expert's of an expert projection (``mlp.experts.{e}.gate_proj`` -> ``mlp.experts.
  gate_proj``)."""
  series: dict[str, dict[int, list[float]]] = {}
  fallbacks: dict[str, int] = {}
  for r in layers:
    name = re.sub(r"\.experts\.\d+\.", ".experts.", r["layer"].split(".", 2)[-1])
    if "expert" in r and r.get("fallback"):
      fallbacks[name] = fallbacks.get(name, 0) + 1
    if r.get("loss") is None or not math.isfinite(r["loss"]) or r["loss"] <= 0:
      continue
    series.setdefault(name, {}).setdefault(r["block"], []).append(r["loss"])
  return series, fallbacks


def plot_losses(path: str, layers: list[dict]) -> None:
  """One line per projection type across blocks, log scale (experts: mean, min-max band)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator

  series, fallbacks = loss_series(layers)
  fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
  for name, by_block in sorted(series.items()):
    xs = sorted(by_block)
    ys = [sum(by_block[b]) / len(by_block[b]) for b in xs]
    label = name
    if ".experts." in name:
      label += " (mean of experts, band min-max" + (
          f", {fallbacks[name]} fell back)" if fallbacks.get(name) else ")")
      ax.fill_between(xs, [min(by_block[b]) for b in xs], [max(by_block[b]) for b in xs],
                      alpha=0.2)
    ax.plot(xs, ys, marker=".", label=label)
  ax.set_yscale("log")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel("block (model.layers.N)")
  ax.set_ylabel("GPTQ loss (sum of (w - q)^2 / Hinv_ii^2 / 2)")
  ax.set_title("GPTQ loss per layer")
  ax.legend(fontsize=7, ncol=2)
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)

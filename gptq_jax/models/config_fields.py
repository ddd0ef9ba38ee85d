"""The typed values of ModelConfig fields that the family mappings (families.py, moe_families.py,
gemma4_family.py) build too: the layer types and kinds, and RopeScaling (a rotary embedding's
frequency scaling, read from and written to Hugging Face `rope_scaling` / `rope_parameters`
dicts; models/rope.py computes the frequencies). Kept apart from config.py, which calls the
family mappings, so that they import one way (config.py -> families.py -> this module)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

ROPE_TYPES = ("llama3", "linear", "yarn", "proportional")
LAYER_TYPES = ("full_attention", "sliding_attention")
FULL, SLIDING = LAYER_TYPES


def fail(field: str, value: Any, allowed: str) -> None:
  """The one-line ValueError of an invalid config field."""
  raise ValueError(f"ModelConfig.{field}={value!r} is invalid: expected {allowed}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """Rotary frequency scaling: "llama3" (smooth, by wavelength), "linear" (positions / factor),
  "yarn" (NTK-by-parts ramp between interpolated and original frequencies, cos/sin scaled by an
  attention factor) or "proportional" (Gemma 4's full-attention layers: only the first
  `partial_rotary_factor` of each head's rotary pairs turn, with the exponents of the whole head;
  the other pairs pass unrotated; frequencies / factor). Field meanings and defaults are those of
  transformers' rope utilities."""

  rope_type: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int | None = 8192
  # yarn only
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float | None = None  # None: derived from factor (and mscale / mscale_all_dim)
  mscale: float | None = None
  mscale_all_dim: float | None = None
  truncate: bool = True
  # proportional only
  partial_rotary_factor: float = 1.0

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      fail("rope_scaling.rope_type", self.rope_type, f"one of {ROPE_TYPES} (or no rope_scaling)")
    if not self.factor > 0:
      fail("rope_scaling.factor", self.factor, "a positive number")
    if self.rope_type == "llama3":
      if not 0 < self.low_freq_factor < self.high_freq_factor:
        fail("rope_scaling.low_freq_factor/high_freq_factor",
              (self.low_freq_factor, self.high_freq_factor), "0 < low_freq_factor < high_freq_factor")
    if not 0 <= self.partial_rotary_factor <= 1:
      fail("rope_scaling.partial_rotary_factor", self.partial_rotary_factor, "a number in [0, 1]")
    if self.rope_type in ("llama3", "yarn"):
      if not isinstance(self.original_max_position_embeddings, int) or (
          self.original_max_position_embeddings <= 0):
        fail("rope_scaling.original_max_position_embeddings",
              self.original_max_position_embeddings, "a positive int")

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any] | None,
                   max_position_embeddings: int | None = None) -> RopeScaling | None:
    """Reads HF `rope_scaling` / `rope_parameters`; None or rope_type "default" means no scaling.

    `max_position_embeddings` fills a missing `original_max_position_embeddings` (as transformers
    does for llama3 / yarn)."""
    if not d:
      return None
    rope_type = d.get("rope_type", d.get("type", "default"))
    if rope_type == "default":
      return None
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"unsupported rope scaling type {rope_type!r}: gptq_jax supports {ROPE_TYPES}")
    if rope_type == "linear":  # only the factor matters
      return cls(rope_type="linear", factor=float(d["factor"]))
    if rope_type == "proportional":
      return cls(rope_type="proportional", factor=float(d.get("factor") or 1.0),
                 partial_rotary_factor=float(d.get("partial_rotary_factor", 1.0)))
    keys = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
            "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")
    kwargs = {k: d[k] for k in keys if d.get(k) is not None}
    if "original_max_position_embeddings" not in kwargs and max_position_embeddings:
      kwargs["original_max_position_embeddings"] = int(max_position_embeddings)
    factor = d.get("factor")
    if factor is None and rope_type == "yarn" and max_position_embeddings:
      factor = max_position_embeddings / kwargs["original_max_position_embeddings"]
    if factor is None:
      raise ValueError(f"rope scaling {rope_type!r} needs a 'factor'")
    return cls(rope_type=rope_type, factor=float(factor), **kwargs)

  def to_hf_dict(self) -> dict[str, Any]:
    if self.rope_type == "linear":
      return {"rope_type": "linear", "factor": self.factor}
    if self.rope_type == "proportional":  # transformers' validator lists no factor (it reads one)
      return {"rope_type": "proportional", "partial_rotary_factor": self.partial_rotary_factor,
              **({"factor": self.factor} if self.factor != 1.0 else {})}
    if self.rope_type == "llama3":
      return {"rope_type": "llama3", "factor": self.factor, "low_freq_factor": self.low_freq_factor,
              "high_freq_factor": self.high_freq_factor,
              "original_max_position_embeddings": self.original_max_position_embeddings}
    out = {"rope_type": "yarn", "factor": self.factor,
           "original_max_position_embeddings": self.original_max_position_embeddings,
           "beta_fast": self.beta_fast, "beta_slow": self.beta_slow, "truncate": self.truncate}
    for k in ("attention_factor", "mscale", "mscale_all_dim"):
      if getattr(self, k) is not None:
        out[k] = getattr(self, k)
    return out


_fail = fail  # the name config.py uses


class LayerKind(NamedTuple):
  """What sets a decoder layer's program apart: its attention type, whether its MLP is a mixture
  of experts, and whether it reads another layer's keys / values (Gemma 4's shared K/V). Layers
  of one kind share one compiled block function."""

  attention: str = FULL
  sparse: bool = False
  kv_shared: bool = False

"""ModelConfig: the architecture of a LLaMA-family decoder, with the Hugging Face config.json mapping.

Frozen and hashable, so it can be a static argument of `jax.jit`. Validated at construction: every
error names the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from gptq_jax.config import BACKENDS

COMPUTE_DTYPES = ("float32", "bfloat16")
ROPE_TYPES = ("llama3", "linear")
SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


def _fail(field: str, value: Any, allowed: str) -> None:
  raise ValueError(f"ModelConfig.{field}={value!r} is invalid: expected {allowed}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """Rotary frequency scaling: Llama 3's "llama3" (smooth, by wavelength) or "linear" (positions / factor)."""

  rope_type: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      _fail("rope_scaling.rope_type", self.rope_type, f"one of {ROPE_TYPES} (or no rope_scaling)")
    if not self.factor > 0:
      _fail("rope_scaling.factor", self.factor, "a positive number")
    if self.rope_type == "llama3":
      if not 0 < self.low_freq_factor < self.high_freq_factor:
        _fail("rope_scaling.low_freq_factor/high_freq_factor",
              (self.low_freq_factor, self.high_freq_factor), "0 < low_freq_factor < high_freq_factor")
      if self.original_max_position_embeddings <= 0:
        _fail("rope_scaling.original_max_position_embeddings",
              self.original_max_position_embeddings, "a positive int")

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any] | None) -> RopeScaling | None:
    """Reads HF `rope_scaling` / `rope_parameters`; None or rope_type "default" means no scaling."""
    if not d:
      return None
    rope_type = d.get("rope_type", d.get("type", "default"))
    if rope_type == "default":
      return None
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"unsupported rope scaling type {rope_type!r}: gptq_jax supports {ROPE_TYPES}")
    keys = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    kwargs = {k: d[k] for k in keys if d.get(k) is not None}
    return cls(rope_type=rope_type, factor=float(d["factor"]), **kwargs)

  def to_hf_dict(self) -> dict[str, Any]:
    if self.rope_type == "linear":
      return {"rope_type": "linear", "factor": self.factor}
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """A LLaMA decoder. `dtype` is the compute dtype (not saved to config.json); params stay as loaded."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int | None = None  # None: = num_attention_heads (no GQA)
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  hidden_act: str = "silu"
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None
  dtype: str = "float32"
  # How packed (GPTQ) linears run: one of gptq_jax.config.BACKENDS. Not saved to config.json.
  backend: str = "auto"

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        _fail(name, value, "a positive int")
    if self.num_key_value_heads is None:
      set_("num_key_value_heads", self.num_attention_heads)
    kv = self.num_key_value_heads
    if not isinstance(kv, int) or kv <= 0 or self.num_attention_heads % kv:
      _fail("num_key_value_heads", kv,
            f"a positive divisor of num_attention_heads={self.num_attention_heads}")
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        _fail("hidden_size", self.hidden_size,
              f"a multiple of num_attention_heads={self.num_attention_heads} (or set head_dim)")
      set_("head_dim", self.hidden_size // self.num_attention_heads)
    if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
      _fail("head_dim", self.head_dim, "a positive even int (rotary pairs)")
    if not self.rms_norm_eps > 0:
      _fail("rms_norm_eps", self.rms_norm_eps, "a positive float")
    if not self.rope_theta > 0:
      _fail("rope_theta", self.rope_theta, "a positive float")
    if isinstance(self.rope_scaling, Mapping):
      set_("rope_scaling", RopeScaling.from_hf_dict(self.rope_scaling))
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      _fail("rope_scaling", self.rope_scaling, "None, a RopeScaling or an HF rope_scaling dict")
    if self.hidden_act != "silu":
      _fail("hidden_act", self.hidden_act, "'silu' (Llama's SwiGLU MLP)")
    if isinstance(self.eos_token_id, (list, tuple)):
      set_("eos_token_id", tuple(int(i) for i in self.eos_token_id))
    if self.dtype not in COMPUTE_DTYPES:
      _fail("dtype", self.dtype, f"one of {COMPUTE_DTYPES}")
    if self.backend not in BACKENDS:
      _fail("backend", self.backend, f"one of {BACKENDS}")

  @property
  def num_kv_groups(self) -> int:
    """Query heads per key/value head."""
    return self.num_attention_heads // self.num_key_value_heads

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

  def replace(self, **changes: Any) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
    """Reads a Hugging Face config.json dict (transformers 4 `rope_scaling` or 5 `rope_parameters`)."""
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"unsupported architecture: model_type={model_type!r} (architectures={archs}); "
                       f"gptq_jax supports {SUPPORTED_ARCHITECTURES} (model_type 'llama')")
    if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
      raise ValueError(f"unsupported architecture: {archs}; gptq_jax supports {SUPPORTED_ARCHITECTURES}")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in d]
    if missing:
      raise ValueError(f"config.json is missing required keys {missing}")
    rope = d.get("rope_parameters")
    if isinstance(rope, Mapping) and "full_attention" in rope:  # per-layer-type form
      rope = rope["full_attention"]
    rope = dict(rope or {})
    rope_theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling") or rope
    kwargs = dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads"), head_dim=d.get("head_dim"),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(rope_theta),
        rope_scaling=RopeScaling.from_hf_dict(scaling),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
        hidden_act=d.get("hidden_act", "silu"), bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"))
    return cls(**kwargs)

  def to_hf_dict(self) -> dict[str, Any]:
    """A config.json dict that transformers (4 and 5) and vLLM read as LlamaForCausalLM."""
    eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
    return {
        "architectures": list(SUPPORTED_ARCHITECTURES),
        "model_type": "llama",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim,
        "hidden_act": self.hidden_act,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_scaling": self.rope_scaling.to_hf_dict() if self.rope_scaling else None,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "attention_bias": self.attention_bias,
        "mlp_bias": self.mlp_bias,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": self.pad_token_id,
    }


LlamaConfig = ModelConfig  # the pre-families name

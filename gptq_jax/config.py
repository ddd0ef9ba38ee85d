"""GPTQConfig: the quantization settings, with Hugging Face Optimum's GPTQQuantizer surface.

Frozen, keyword-only after ``bits``, validated at construction. Every error names the field, the
value and what is allowed. ``to_dict`` / ``from_dict`` round-trip with the Hugging Face
``quantization_config`` dict (the keys transformers, Optimum and GPTQModel write beside weights).

Interactions between fields (decided here, as the references do):

* ``desc_act=True`` with ``act_group_aware=True``: act-order wins and ``act_group_aware`` is set to
  False with a warning (what transformers' GPTQConfig does).
* ``act_group_aware`` with ``group_size=-1``: GAR reorders *within groups*, so without groups it is a
  no-op; the field is normalised to False (no warning: it is the default).
* ``format="gptq"`` (v1) with ``sym=False``: v1 stores ``zero - 1`` in an unsigned field, so a zero
  point of 0 cannot be stored. We warn, and the solver limits asymmetric zero points to
  ``[1, maxq]`` so that the v1 checkpoint is exact (use ``format="gptq_v2"`` for the unrestricted
  reference grid). Nothing is silently corrupted: packing a zero of 0 as v1 raises.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Mapping, Sequence

BITS = (2, 3, 4, 8)
FORMATS = ("gptq", "gptq_v2")
BACKENDS = ("auto", "xla", "pallas", "pallas_interpret")
MSE_WEIGHTS = ("none", "hessian")
ROTATIONS = ("none", "hadamard", "random")
NAMED_DATASETS = ("wikitext2", "c4", "c4-new")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(field: str, value: Any, allowed: str) -> None:
  raise ValueError(f"GPTQConfig.{field}={value!r} is not allowed: {field} must be {allowed}.")


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
  """GPTQ settings. ``bits`` is required; everything else is keyword-only.

  Optimum fields: bits, dataset, group_size, damp_percent, desc_act, act_group_aware, sym,
  true_sequential, format, backend. Ours: static_groups, block_size (the lazy-update block,
  ``blocksize`` in the paper), damp_auto_increment (damping escalation step when the Cholesky
  factorisation fails; 0 disables escalation), nsamples / seqlen / seed (calibration data), mse
  (clipping search norm exponent; 0 = plain min/max grid, 2.4 in the references), mse_weight (the
  search's error in the GPTQ solver: "none" = the references' ``sum |q - x|^mse``, "hessian" = each
  column's error divided by the inverse-Hessian factor's diagonal ``U_jj``, the error GPTQ's column
  loop charges it; RTN has no Hessian and ignores it), refine_steps /
  refine_lr / refine_rounding / refine_batch / refine_seqlen (block-wise optax refinement after
  GPTQ, see ``pipeline/refine.py``: Adam steps per block, 0 = off; the log-scale learning rate;
  also learn a rounding offset per weight; calibration samples per step; tokens of each sample
  trained on, a causal prefix, 0 = all), gptaq / gptaq_alpha (GPTAQ's
  asymmetric-calibration correction, ``core/gptaq.py``: each linear also matches the float model's
  inputs; GPTQModel's ``GPTAQConfig(alpha=0.25)``), rotation ("none", "hadamard" or "random":
  rotate the residual stream by an orthogonal matrix before quantizing, ``pipeline/rotation.py``;
  the result is a plain model of the same family). Mixtures of experts (``pipeline/experts.py``):
  fallback_threshold (an expert that receives fewer than this fraction of the calibration tokens
  is quantized by round-to-nearest, GPTQModel's ``Fallback`` default of 0.5 %; 0 = only experts
  that receive none), moe_routing (which experts see which tokens in the calibration passes only:
  "native" = the model's routing, "all" = every expert sees every token, GPTQModel's
  ``ExpertsRoutingBypass``, "topk:N" = the N most probable experts, ``ExpertsRoutingOverride``).
  """

  bits: int
  _: dataclasses.KW_ONLY
  dataset: str | Sequence[str] | None = None
  group_size: int = 128
  damp_percent: float = 0.1
  desc_act: bool = False
  act_group_aware: bool = True
  sym: bool = True
  true_sequential: bool = True
  format: str = "gptq"
  backend: str | None = None
  static_groups: bool = False
  block_size: int = 128
  damp_auto_increment: float = 0.01
  nsamples: int = 128
  seqlen: int = 2048
  seed: int = 0
  mse: float = 0.0
  mse_weight: str = "none"
  refine_steps: int = 0
  refine_lr: float = 5e-3
  refine_rounding: bool = False
  refine_batch: int = 2
  refine_seqlen: int = 128
  gptaq: bool = False
  gptaq_alpha: float = 0.25
  rotation: str = "none"
  # Per-module precision, GPTQModel's ``dynamic`` (see _normalize_dynamic and pipeline/dynamic.py):
  # held as ((pattern, ((key, value), ...)), ...) so the config stays hashable; given as a dict.
  dynamic: Any = None
  lm_head: bool = False
  fallback_threshold: float = 0.005
  moe_routing: str = "native"

  def __post_init__(self) -> None:
    if not _is_int(self.bits) or self.bits not in BITS:
      _fail("bits", self.bits, f"one of {BITS}")
    if not _is_int(self.group_size) or (self.group_size <= 0 and self.group_size != -1):
      _fail("group_size", self.group_size, "an int > 0, or -1 for one group per output row")
    if not _is_number(self.damp_percent) or not 0 < self.damp_percent < 1:
      _fail("damp_percent", self.damp_percent, "a number with 0 < damp_percent < 1")
    if not _is_number(self.damp_auto_increment) or not 0 <= self.damp_auto_increment < 1:
      _fail("damp_auto_increment", self.damp_auto_increment, "a number in [0, 1) (0 disables)")
    for name in ("desc_act", "act_group_aware", "sym", "true_sequential", "static_groups",
                 "refine_rounding", "gptaq"):
      if not isinstance(getattr(self, name), bool):
        _fail(name, getattr(self, name), "a bool (True or False)")
    if not isinstance(self.format, str) or self.format.lower() not in FORMATS:
      _fail("format", self.format, f"one of {FORMATS}")
    object.__setattr__(self, "format", self.format.lower())
    backend = "auto" if self.backend is None else self.backend
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
      _fail("backend", self.backend, f"None or one of {BACKENDS}")
    object.__setattr__(self, "backend", backend.lower())
    for name in ("block_size", "nsamples", "seqlen", "refine_batch"):
      if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
        _fail(name, getattr(self, name), "an int > 0")
    if not _is_int(self.seed) or self.seed < 0:
      _fail("seed", self.seed, "an int >= 0")
    if not _is_number(self.mse) or self.mse < 0:
      _fail("mse", self.mse, "0 (off) or a norm exponent > 0 (2.4 in the references)")
    if self.mse_weight not in MSE_WEIGHTS:
      _fail("mse_weight", self.mse_weight, f"one of {MSE_WEIGHTS}")
    if not _is_int(self.refine_seqlen) or self.refine_seqlen < 0:
      _fail("refine_seqlen", self.refine_seqlen, "an int >= 0 (0 = whole calibration windows)")
    if not _is_int(self.refine_steps) or self.refine_steps < 0:
      _fail("refine_steps", self.refine_steps, "an int >= 0 (0 = no refinement)")
    if not _is_number(self.refine_lr) or not self.refine_lr > 0:
      _fail("refine_lr", self.refine_lr, "a number > 0")
    if not _is_number(self.gptaq_alpha) or not self.gptaq_alpha >= 0:
      _fail("gptaq_alpha", self.gptaq_alpha, "a number >= 0 (0.25 in GPTQModel; 0 = plain GPTQ)")
    if self.rotation not in ROTATIONS:
      _fail("rotation", self.rotation, f"one of {ROTATIONS}")
    if self.static_groups and self.group_size == -1:
      _fail("static_groups", self.static_groups, "False when group_size=-1 (there are no groups)")
    self._check_dataset()
    if not _is_number(self.fallback_threshold) or not 0 <= self.fallback_threshold < 1:
      _fail("fallback_threshold", self.fallback_threshold,
            "a fraction of the calibration tokens in [0, 1) (0.005 = GPTQModel's 0.5 %)")
    routing_topk(self.moe_routing)  # validates
    if not isinstance(self.lm_head, bool):
      _fail("lm_head", self.lm_head, "a bool (True quantizes the output projection too)")
    object.__setattr__(self, "dynamic", _normalize_dynamic(self))
    if self.desc_act and self.act_group_aware:
      warnings.warn(
          "GPTQConfig: act_group_aware has been disabled because desc_act=True (act-order "
          "reorders all columns; GAR only applies without it). Pass act_group_aware=False to "
          "silence this.", UserWarning, stacklevel=3)
      object.__setattr__(self, "act_group_aware", False)
    if self.group_size == -1 and self.act_group_aware:
      object.__setattr__(self, "act_group_aware", False)
    if self.format == "gptq" and not self.sym:
      warnings.warn(
          "GPTQConfig: format='gptq' (v1) cannot store an asymmetric zero point of 0; zero "
          "points are limited to [1, 2**bits - 1] so the checkpoint stays exact. Use "
          "format='gptq_v2' for the unrestricted grid.", UserWarning, stacklevel=3)

  def _check_dataset(self) -> None:
    ds = self.dataset
    if ds is None:
      return
    if isinstance(ds, str):
      if ds in NAMED_DATASETS or os.path.exists(ds):
        return
      _fail("dataset", ds, f"one of {NAMED_DATASETS}, an existing text file / folder / .npy "
            "token array, or a list of strings")
    if isinstance(ds, (list, tuple)):
      if not ds:
        _fail("dataset", ds, "a non-empty list of strings")
      bad = [type(s).__name__ for s in ds if not isinstance(s, str)]
      if bad:
        _fail("dataset", f"<list with {bad[0]} items>", "a list of strings")
      object.__setattr__(self, "dataset", tuple(ds))
      return
    _fail("dataset", ds, f"None, one of {NAMED_DATASETS}, a path, or a list of strings")

  # --- derived settings -------------------------------------------------------------------------
  @property
  def maxq(self) -> int:
    return 2**self.bits - 1

  @property
  def min_zero(self) -> int:
    """Smallest zero point the solver may choose (1 for v1 asymmetric, see module doc)."""
    return 1 if (self.format == "gptq" and not self.sym) else 0

  def dynamic_dict(self) -> dict[str, dict[str, Any]] | None:
    """``dynamic`` as GPTQModel writes it: ``{pattern: {field: value}}`` in match order."""
    if not self.dynamic:
      return None
    return {pattern: dict(overrides) for pattern, overrides in self.dynamic}

  def replace(self, **changes: Any) -> "GPTQConfig":
    return dataclasses.replace(self, **changes)

  # --- Hugging Face quantization_config ---------------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    """The Hugging Face ``quantization_config`` dict (plus our own fields under ``gptq_jax``)."""
    # Only what transformers / GPTQModel / vLLM accept: a named set, a list of strings, or None (a
    # local path is neither portable nor valid there; exports describe it under meta.calibration).
    dataset = self.dataset if self.dataset in NAMED_DATASETS else None
    if isinstance(self.dataset, tuple):
      dataset = list(self.dataset)
    ours = {f: getattr(self, f) for f in _OURS if f != "static_groups"}
    return {
        "quant_method": "gptq",
        "bits": self.bits,
        "group_size": self.group_size,
        "damp_percent": self.damp_percent,
        "desc_act": self.desc_act,
        "act_group_aware": self.act_group_aware,
        "sym": self.sym,
        "true_sequential": self.true_sequential,
        "static_groups": self.static_groups,
        "format": self.format,
        "checkpoint_format": self.format,
        "backend": self.backend,
        "dataset": dataset,
        "meta": {"quantizer": ["gptq_jax"],
                 "gptaq": {"alpha": self.gptaq_alpha} if self.gptaq else None,
                 # folded into the weights: no online transform (so not GPTQModel's "rotation")
                 "rotation_folded": self.rotation},
        "gptq_jax": ours,
        "lm_head": self.lm_head,
        **({"dynamic": self.dynamic_dict()} if self.dynamic else {}),
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "GPTQConfig":
    """Build from a Hugging Face ``quantization_config`` (transformers / Optimum / GPTQModel)."""
    if not isinstance(d, Mapping):
      raise ValueError(f"GPTQConfig.from_dict needs a mapping, got {type(d).__name__}")
    method = d.get("quant_method", "gptq")
    method = getattr(method, "value", method)  # transformers may hand over its enum
    if str(method).lower() != "gptq":
      raise ValueError(f"quantization_config.quant_method={method!r} is not supported: only 'gptq'")
    if "bits" not in d:
      raise ValueError("quantization_config has no 'bits' field")
    kwargs: dict[str, Any] = {"bits": d["bits"]}
    for key in ("group_size", "damp_percent", "desc_act", "sym", "true_sequential",
                "static_groups", "act_group_aware"):
      if d.get(key) is not None:
        kwargs[key] = d[key]
    fmt = d.get("checkpoint_format") or d.get("format")
    if fmt is not None:
      kwargs["format"] = fmt
    backend = d.get("backend")
    if isinstance(backend, str) and backend.lower() in BACKENDS:
      kwargs["backend"] = backend
    dataset = d.get("dataset")
    if isinstance(dataset, list) or (isinstance(dataset, str) and dataset in NAMED_DATASETS):
      kwargs["dataset"] = dataset
    if d.get("dynamic"):  # other tools' extra override keys (e.g. pack_dtype) do not apply here
      kwargs["dynamic"] = {p: {k: v for k, v in (o or {}).items() if k in DYNAMIC_FIELDS}
                           for p, o in dict(d["dynamic"]).items()}
    if d.get("lm_head") is not None:
      kwargs["lm_head"] = bool(d["lm_head"])
    meta = d.get("meta") if isinstance(d.get("meta"), Mapping) else {}
    if isinstance(meta.get("gptaq"), Mapping):  # GPTQModel's meta: {"alpha": a, "device": ...}
      kwargs["gptaq"], kwargs["gptaq_alpha"] = True, meta["gptaq"].get("alpha", 0.25)
    if meta.get("rotation_folded") in ROTATIONS:
      kwargs["rotation"] = meta["rotation_folded"]
    ours = d.get("gptq_jax") or {}
    for key in _OURS:
      if key in ours:
        kwargs[key] = ours[key]
    if kwargs.get("desc_act") and kwargs.get("act_group_aware"):
      kwargs["act_group_aware"] = False  # a checkpoint written with desc_act: no warning needed
    return cls(**kwargs)


_OURS = ("static_groups", "block_size", "damp_auto_increment", "nsamples", "seqlen", "seed", "mse",
         "mse_weight", "refine_steps", "refine_lr", "refine_rounding", "refine_batch",
         "refine_seqlen", "gptaq", "gptaq_alpha", "rotation", "fallback_threshold", "moe_routing")

MOE_ROUTINGS = ("native", "all", "topk:N")


def routing_topk(routing: Any, num_experts: int | None = None) -> int | None:
  """Experts per token in the calibration passes for ``moe_routing``: None = the model's own;
  "all" = ``num_experts``; "topk:N" = N (at most ``num_experts``). Raises for anything else."""
  if routing == "native":
    return None
  if routing == "all":
    return num_experts if num_experts is not None else -1
  head, _, n = str(routing).partition(":")
  if head != "topk" or not n.isdigit() or int(n) < 1:
    _fail("moe_routing", routing, f"one of {MOE_ROUTINGS} (N a positive int)")
  return int(n) if num_experts is None else min(int(n), num_experts)


DYNAMIC_FIELDS = ("bits", "group_size", "sym", "desc_act", "mse")


def _normalize_dynamic(cfg: "GPTQConfig") -> Any:
  """GPTQModel's ``dynamic``: ``{pattern: {field: value}}``, patterns tried in order, the first
  whose regex matches the start of a module name (``model.layers.3.mlp.down_proj``, ``lm_head``)
  decides. ``-:<regex>`` leaves the module in float; ``+:<regex>`` or a bare regex overrides
  ``DYNAMIC_FIELDS``. Accepts a dict, a JSON string, or the normalized tuple form."""
  import json  # noqa: PLC0415
  import re  # noqa: PLC0415

  dyn = cfg.dynamic
  if dyn is None:
    return None
  if isinstance(dyn, str):
    try:
      dyn = json.loads(dyn)
    except json.JSONDecodeError as e:
      _fail("dynamic", cfg.dynamic, f"a JSON object {{pattern: {{field: value}}}} ({e})")
  items = list(dyn.items()) if isinstance(dyn, Mapping) else dyn
  if not isinstance(items, (list, tuple)) or not items:
    _fail("dynamic", cfg.dynamic, "None or a non-empty {pattern: {field: value}} mapping")
  out = []
  for entry in items:
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
      _fail("dynamic", cfg.dynamic, "a {pattern: {field: value}} mapping with string patterns")
    pattern, overrides = entry
    overrides = dict(overrides) if isinstance(overrides, (Mapping, list, tuple)) else overrides
    if not isinstance(overrides, dict):
      _fail(f"dynamic[{pattern!r}]", overrides, "a {field: value} mapping ({} for '-:' rules)")
    raw = pattern[2:] if pattern.startswith(("+:", "-:")) else pattern
    try:
      re.compile(raw)
    except re.error as e:
      _fail("dynamic", pattern, f"a valid regular expression ({e})")
    bad = sorted(set(overrides) - set(DYNAMIC_FIELDS))
    if bad:
      _fail(f"dynamic[{pattern!r}]", bad[0], f"one of {DYNAMIC_FIELDS}")
    if pattern.startswith("-:"):
      overrides = {}
    elif overrides:  # every override must make a valid config on its own
      try:
        module_config(cfg.replace(dynamic=None), overrides)
      except ValueError as e:
        raise ValueError(f"GPTQConfig.dynamic[{pattern!r}]: {e}") from None
    out.append((pattern, tuple(sorted(overrides.items()))))
  return tuple(out)


def module_config(cfg: "GPTQConfig", overrides: Mapping[str, Any]) -> "GPTQConfig":
  """``cfg`` with one ``dynamic`` rule's overrides applied (act-order turns GAR off, silently)."""
  changes = dict(overrides)
  if changes.get("desc_act"):
    changes["act_group_aware"] = False
  if changes.get("group_size") == -1:
    changes.setdefault("static_groups", False)
  return cfg.replace(dynamic=None, **changes)

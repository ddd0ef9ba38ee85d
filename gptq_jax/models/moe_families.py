"""The mixture-of-experts families as small mappings (families.py calls in here): Qwen3-MoE
(`qwen3_moe`), Qwen2-MoE (`qwen2_moe`) and Mixtral (`mixtral`).

* config.json <-> the ModelConfig MoE fields (`moe_config_kwargs`, `moe_config_json`).
* Tensor names of a sparse layer: the router, an optional shared expert (dense specs, one HF
  tensor per param leaf) and the experts (`ExpertSpec`: one param leaf `[E, in, out]` from E
  per-expert HF tensors, or from transformers 5's fused `mlp.experts.gate_up_proj [E, 2I, H]` /
  `mlp.experts.down_proj [E, H, I]`).
* Mixtral's files name its MLP `block_sparse_moe` with experts `w1` (gate), `w3` (up), `w2`
  (down), as transformers 5 still writes them; transformers 5's module names (`mlp.gate`,
  `mlp.experts.{e}.gate_proj`) are accepted as alternatives (`alternative_names`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

# `ModelConfig` in the annotations is models/config.py's (never evaluated: config.py imports the
# family mappings, which import only the field types they build).
from gptq_jax.models.config_fields import FULL, SLIDING

MOE_MODEL_TYPES = ("qwen3_moe", "qwen2_moe", "mixtral")
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
_MIXTRAL_PROJ = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
ROUTER = ("mlp", "gate")
SHARED_GATE = ("mlp", "shared_expert_gate")
SCALED_ROUTER = ("router", "proj")  # Gemma 4's (moe.ScaledRouter, at the layer's top level)
# quantized only when a dynamic "+:" rule names them
FLOAT_BY_DEFAULT = (ROUTER, SHARED_GATE, SCALED_ROUTER)


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
  """One stacked expert param: `path` (inside `layers_{i}`, ending in "kernel", value `[E, in,
  out]`), the per-expert HF names (each `[out, in]`) and transformers 5's fused tensor holding the
  same weights: `fused_name` `[E, parts * out, in]`, this projection being part `part`."""

  path: tuple[str, ...]
  names: tuple[str, ...]
  shape: tuple[int, int]  # HF [out, in] of one expert
  fused_name: str
  part: int
  parts: int
  saved_fused: bool = False  # transformers writes this model's experts fused (Gemma 4)

  @property
  def fused_shape(self) -> tuple[int, int, int]:
    return (len(self.names), self.parts * self.shape[0], self.shape[1])


def moe_config_kwargs(d: Mapping[str, Any], n_layers: int) -> dict[str, Any]:
  """The ModelConfig fields of an MoE config.json (beside those every family reads)."""
  mt = d["model_type"]
  experts = d.get("num_experts", d.get("num_local_experts"))
  out: dict[str, Any] = dict(num_experts=int(experts), num_experts_per_tok=int(d["num_experts_per_tok"]))
  window = d.get("sliding_window")
  if mt == "mixtral":
    return dict(out, norm_topk_prob=True, sliding_window=window,
                layer_types=(SLIDING if window else FULL,) * n_layers)
  window = window if d.get("use_sliding_window") else None
  out.update(moe_intermediate_size=d.get("moe_intermediate_size"),
             norm_topk_prob=bool(d.get("norm_topk_prob", False)),
             decoder_sparse_step=int(d.get("decoder_sparse_step") or 1),
             mlp_only_layers=tuple(d.get("mlp_only_layers") or ()), sliding_window=window)
  if mt == "qwen3_moe":  # the window, when on, applies to every layer
    return dict(out, attention_bias=bool(d.get("attention_bias", False)), qk_norm=True,
                layer_types=(SLIDING if window else FULL,) * n_layers)
  types = d.get("layer_types") or [
      SLIDING if (i + 1) % 2 and i < d.get("max_window_layers", 28) and window else FULL
      for i in range(n_layers)]
  qkv_bias = bool(d.get("qkv_bias", True))
  return dict(out, qkv_bias=qkv_bias, o_bias=False, layer_types=tuple(types),
              shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0),
              shared_expert_gate=True)


def moe_problems(cfg: ModelConfig) -> list[str]:
  """What this config sets that its MoE family's transformers model cannot express."""
  mt, problems = cfg.model_type, []
  if mt == "gemma4_text":  # its experts are checked with its other fields (gemma4_family.py)
    return []
  if mt not in MOE_MODEL_TYPES:
    return ["num_experts > 0 (a mixture of experts)"] if cfg.num_experts else []
  if not cfg.num_experts:
    problems.append("num_experts=0 (a dense model)")
  if cfg.router != "softmax_topk":
    problems.append(f"router={cfg.router!r}")
  if (mt == "qwen2_moe") != bool(cfg.shared_expert_intermediate_size and cfg.shared_expert_gate):
    problems.append("the shared expert and its gate (Qwen2-MoE has both, the others neither)")
  sliding = [t == SLIDING for t in cfg.layer_types]
  if mt != "qwen2_moe" and any(sliding) and not all(sliding):
    problems.append("a sliding window on some layers only")
  if mt == "mixtral":
    if not cfg.norm_topk_prob or cfg.decoder_sparse_step != 1 or cfg.mlp_only_layers:
      problems.append("Mixtral renormalizes the top-k weights and has no dense-only layers")
    if cfg.moe_intermediate_size not in (None, cfg.intermediate_size):
      problems.append("Mixtral's experts have width intermediate_size")
  return problems


def moe_config_json(cfg: ModelConfig, out: dict[str, Any]) -> None:
  """Writes the MoE family's keys into the config.json dict `out` (in place)."""
  mt = cfg.model_type
  sliding = [i for i, t in enumerate(cfg.layer_types) if t == SLIDING]
  out.update(num_experts_per_tok=cfg.num_experts_per_tok)
  for key in ("mlp_bias",) + (("attention_bias",) if mt != "qwen3_moe" else ()):
    out.pop(key, None)
  if mt == "mixtral":
    out.update(num_local_experts=cfg.num_experts, sliding_window=cfg.sliding_window if sliding
               else None, router_jitter_noise=0.0)
    return
  out.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.expert_intermediate_size,
             norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=cfg.decoder_sparse_step,
             mlp_only_layers=list(cfg.mlp_only_layers), use_sliding_window=bool(sliding),
             sliding_window=cfg.sliding_window if sliding else None)
  if mt == "qwen2_moe":
    out.update(qkv_bias=cfg.qkv_bias, layer_types=list(cfg.layer_types),
               max_window_layers=cfg.num_hidden_layers,
               shared_expert_intermediate_size=cfg.shared_expert_intermediate_size)


def _mlp_prefix(cfg: ModelConfig, i: int) -> str:
  return f"model.layers.{i}." + ("block_sparse_moe" if cfg.model_type == "mixtral" else "mlp")


def _expert_name(cfg: ModelConfig, i: int, e: int, proj: str) -> str:
  if cfg.model_type == "mixtral":
    return f"{_mlp_prefix(cfg, i)}.experts.{e}.{_MIXTRAL_PROJ[proj]}.weight"
  return f"{_mlp_prefix(cfg, i)}.experts.{e}.{proj}.weight"


def sparse_mlp_specs(cfg: ModelConfig, i: int) -> Iterator[tuple[tuple[str, ...], str, tuple[int, ...]]]:
  """(param path, HF name, HF shape) of a sparse layer's router and shared expert."""
  h = cfg.hidden_size
  yield ROUTER + ("kernel",), f"{_mlp_prefix(cfg, i)}.gate.weight", (cfg.num_experts, h)
  s = cfg.shared_expert_intermediate_size
  if s:
    shapes = {"gate_proj": (s, h), "up_proj": (s, h), "down_proj": (h, s)}
    for proj, shape in shapes.items():
      yield ("mlp", "shared_expert", proj, "kernel"), f"model.layers.{i}.mlp.shared_expert.{proj}.weight", shape
  if cfg.shared_expert_gate:
    yield SHARED_GATE + ("kernel",), f"model.layers.{i}.mlp.shared_expert_gate.weight", (1, h)


def expert_specs(cfg: ModelConfig, i: int, root: tuple[str, ...] = ("mlp",),
                 saved_fused: bool = False) -> Iterator[ExpertSpec]:
  """The stacked expert params of sparse layer i, under `root` in the layer (Gemma 4: none, its
  experts are `model.layers.{i}.experts`)."""
  h, m, E = cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_experts
  fused = ".".join((f"model.layers.{i}", *root, "experts"))
  for proj in EXPERT_PROJS:
    names = tuple(_expert_name(cfg, i, e, proj) if root == ("mlp",) else
                  f"{fused}.{e}.{proj}.weight" for e in range(E))
    path = (*root, "experts", proj, "kernel")
    if proj == "down_proj":
      yield ExpertSpec(path, names, (h, m), f"{fused}.down_proj", 0, 1, saved_fused)
    else:
      yield ExpertSpec(path, names, (m, h), f"{fused}.gate_up_proj", EXPERT_PROJS.index(proj), 2,
                       saved_fused)


def alternative_names(cfg: ModelConfig, name: str) -> tuple[str, ...]:
  """Other names the same tensor may have on disk (Mixtral: transformers 5's module names)."""
  if cfg.model_type != "mixtral" or ".block_sparse_moe." not in name:
    return ()
  alt = name.replace(".block_sparse_moe.", ".mlp.")
  for proj, w in _MIXTRAL_PROJ.items():
    alt = alt.replace(f".{w}.", f".{proj}.")
  return (alt,)


def module_tensor_name(cfg: ModelConfig, name: str) -> str:
  """The name a tensor has in transformers 5's modules once experts are one module each (what
  GPTQ loaders address: GPTQModel expects Mixtral's `mlp.experts.{e}.gate_proj.qweight`)."""
  return (alternative_names(cfg, name) or (name,))[0]


def sparse_groups(cfg: ModelConfig) -> tuple[tuple[tuple[str, ...], ...], ...]:
  """The true-sequential groups after attention in a sparse layer: the router, shared-expert
  gate and up projections with the experts' gate / up (the router and the shared-expert gate stay
  float unless a dynamic rule names them), then the down projections."""
  up: list[tuple[str, ...]] = [ROUTER, ("mlp", "experts", "gate_proj"), ("mlp", "experts", "up_proj")]
  down: list[tuple[str, ...]] = [("mlp", "experts", "down_proj")]
  if cfg.shared_expert_intermediate_size:
    up += [("mlp", "shared_expert", "gate_proj"), ("mlp", "shared_expert", "up_proj")]
    down.append(("mlp", "shared_expert", "down_proj"))
  if cfg.shared_expert_gate:
    up.append(SHARED_GATE)
  return tuple(up), tuple(down)

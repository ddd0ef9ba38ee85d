"""Gemma 4 (text, `gemma4_text` / Gemma4ForCausalLM): config.json <-> ModelConfig fields, and the
tensors of its mixture-of-experts layers. families.py calls these for model_type gemma4_text.

What transformers 5 reads and writes: per-layer-type `rope_parameters` (proportional RoPE with a
partial rotary factor on the full-attention layers), the full layers' head size and key/value
heads as `per_layer_config` overrides (or, in older files, `global_head_dim` /
`num_global_key_value_heads`, the head size defaulting to 512), the K/V sharing, k_eq_v,
double-wide MLP and per-layer input settings, and `enable_moe_block` (every layer sparse:
`num_experts`, `top_k_experts`, `moe_intermediate_size`; router kind "gemma4", the dense MLP kept
beside the experts). A sparse layer's tensors: `router.proj.weight [E, hidden]`, `router.scale`,
`router.per_expert_scale`, three more norms, and the experts, which transformers writes fused
(`experts.gate_up_proj [E, 2I, hidden]`, `experts.down_proj [E, hidden, I]`).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

# `ModelConfig` in the annotations is models/config.py's (never evaluated: config.py imports the
# family mappings, which import only the field types they build).
from gptq_jax.models.config_fields import FULL, SLIDING, RopeScaling
from gptq_jax.models.moe_families import ExpertSpec, expert_specs

_GEMMA4_ROPE = {FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                       "rope_theta": 1_000_000.0},
                SLIDING: {"rope_type": "default", "rope_theta": 10_000.0}}  # transformers' defaults


def _gemma4_full_layer_overrides(d: Mapping[str, Any], types: list[str]) -> dict[str, Any]:
  """{"head_dim"?, "num_key_value_heads"?} of the full-attention layers, from `per_layer_config`
  (what transformers 5 writes) or `global_head_dim` / `num_global_key_value_heads` (what it
  reads, default head size 512); refuses overrides that differ between the full layers or touch
  the sliding ones."""
  per_layer = d.get("per_layer_config")
  if per_layer is None:
    out = {"head_dim": d.get("global_head_dim", 512)}
    if d.get("attention_k_eq_v", False) and d.get("num_global_key_value_heads") is not None:
      out["num_key_value_heads"] = d["num_global_key_value_heads"]
    return out
  by_layer = {int(k): dict(v) for k, v in dict(per_layer).items()}
  seen = [by_layer.get(i, {}) for i, t in enumerate(types) if t == FULL]
  sliding = [i for i, t in enumerate(types) if t == SLIDING and by_layer.get(i)]
  bad_keys = {k for v in by_layer.values() for k in v} - {"head_dim", "num_key_value_heads"}
  if sliding or bad_keys or any(v != seen[0] for v in seen):
    raise ValueError(f"Gemma 4 per_layer_config {dict(per_layer)} is not supported: gptq_jax "
                     "supports head_dim / num_key_value_heads overrides shared by every "
                     "full-attention layer (and none on the sliding layers)")
  return seen[0] if seen else {}


def gemma4_from_hf(d: Mapping[str, Any], full: dict, local: dict | None, max_pos: int
                    ) -> dict[str, Any]:
  if d.get("use_bidirectional_attention") is not None:
    raise ValueError("Gemma 4 with use_bidirectional_attention="
                     f"{d['use_bidirectional_attention']!r} is not supported: gptq_jax runs "
                     "causal decoders (set it to null)")
  n = d["num_hidden_layers"]
  types = list(d.get("layer_types") or [SLIDING if (i + 1) % 6 else FULL for i in range(n)])
  types[-1] = FULL  # as transformers: the last layer always attends fully
  if not (d.get("rope_parameters") or {}).get(FULL):
    full = dict(_GEMMA4_ROPE[FULL], **full)
  local = local or dict(_GEMMA4_ROPE[SLIDING])
  overrides = _gemma4_full_layer_overrides(d, types)
  return dict(
      qk_norm=True, value_norm=True, norm_float_scale=True, scale_embeddings=True,
      sandwich_norms=True, layer_scalar=True, query_pre_attn_scalar=1.0,  # scores unscaled
      attention_bias=bool(d.get("attention_bias", False)),
      hidden_act=d.get("hidden_activation") or "gelu_pytorch_tanh",
      sliding_window=d.get("sliding_window", 512), layer_types=tuple(types),
      rope_theta=float(full.get("rope_theta", 1_000_000.0)),
      rope_scaling=RopeScaling.from_hf_dict(full, max_pos),
      rope_local_theta=float(local.get("rope_theta", 10_000.0)),
      rope_local_scaling=RopeScaling.from_hf_dict(local, max_pos),
      final_logit_softcapping=d.get("final_logit_softcapping"),
      global_head_dim=overrides.get("head_dim"),
      global_num_key_value_heads=overrides.get("num_key_value_heads"),
      attention_k_eq_v=bool(d.get("attention_k_eq_v", False)),
      num_kv_shared_layers=int(d.get("num_kv_shared_layers", 0)),
      use_double_wide_mlp=bool(d.get("use_double_wide_mlp", False)),
      hidden_size_per_layer_input=int(d.get("hidden_size_per_layer_input", 256) or 0),
      vocab_size_per_layer_input=d.get("vocab_size_per_layer_input", 262_144), **_moe(d))


def _moe(d: Mapping[str, Any]) -> dict[str, Any]:
  """The mixture-of-experts fields of `enable_moe_block` (every layer sparse)."""
  if not d.get("enable_moe_block"):
    return {}
  missing = [k for k in ("num_experts", "top_k_experts") if not d.get(k)]
  if missing:
    raise ValueError(f"Gemma 4 config.json with enable_moe_block=True is missing {missing}")
  return dict(num_experts=int(d["num_experts"]), num_experts_per_tok=int(d["top_k_experts"]),
              moe_intermediate_size=d.get("moe_intermediate_size"), norm_topk_prob=True,
              router="gemma4", dense_mlp_beside_experts=True)


_GEMMA4_FIELDS = dict(value_norm=True, norm_float_scale=True, layer_scalar=True)  # off elsewhere
_GEMMA4_ONLY = ("global_head_dim", "global_num_key_value_heads", "attention_k_eq_v",
                "num_kv_shared_layers", "use_double_wide_mlp", "hidden_size_per_layer_input",
                "dense_mlp_beside_experts")
# a Gemma 4 sparse model: these fields as transformers' Gemma4TextDecoderLayer has them
_GEMMA4_MOE = dict(router="gemma4", dense_mlp_beside_experts=True, norm_topk_prob=True,
                   shared_expert_intermediate_size=0, decoder_sparse_step=1, mlp_only_layers=())


def gemma4_problems(cfg: ModelConfig) -> list[str]:
  """What a Gemma 4 config.json cannot express (or, for another family, its Gemma 4 fields)."""
  if cfg.model_type != "gemma4_text":
    return [f"{k}={getattr(cfg, k)}" for k in (*_GEMMA4_FIELDS, *_GEMMA4_ONLY)
            if getattr(cfg, k)] + (["router='gemma4'"] if cfg.router == "gemma4" else [])
  want = dict(_GEMMA4_FIELDS, **(_GEMMA4_MOE if cfg.num_experts else {}))
  problems = [f"{k}={getattr(cfg, k)}" for k, v in want.items() if getattr(cfg, k) != v]
  if cfg.query_pre_attn_scalar != 1.0:
    problems.append(f"query_pre_attn_scalar={cfg.query_pre_attn_scalar} (Gemma 4 scores are "
                    "unscaled: 1.0)")
  if cfg.layer_types[-1] != FULL:
    problems.append("a last layer that is not full attention")
  return problems


def gemma4_to_hf(cfg: ModelConfig, out: dict[str, Any]) -> None:
  for k in ("hidden_act", "rope_theta", "rope_scaling", "mlp_bias"):
    out.pop(k, None)
  full = dict(cfg.rope_scaling.to_hf_dict() if cfg.rope_scaling else {"rope_type": "default"},
              rope_theta=cfg.rope_theta)
  local = dict(cfg.rope_local_scaling.to_hf_dict() if cfg.rope_local_scaling else
               {"rope_type": "default"}, rope_theta=cfg.rope_local_theta or cfg.rope_theta)
  override = {"head_dim": cfg.layer_head_dim(FULL)}  # written even when equal: the default is 512
  if cfg.global_num_key_value_heads:
    override["num_key_value_heads"] = cfg.global_num_key_value_heads
  out.update(
      hidden_activation=cfg.hidden_act, sliding_window=cfg.sliding_window,
      layer_types=list(cfg.layer_types), rope_parameters={FULL: full, SLIDING: local},
      final_logit_softcapping=cfg.final_logit_softcapping, use_bidirectional_attention=None,
      per_layer_config={str(i): dict(override) for i, t in enumerate(cfg.layer_types)
                        if t == FULL},
      attention_k_eq_v=cfg.attention_k_eq_v, num_kv_shared_layers=cfg.num_kv_shared_layers,
      use_double_wide_mlp=cfg.use_double_wide_mlp, enable_moe_block=bool(cfg.num_experts),
      num_experts=cfg.num_experts or None, top_k_experts=cfg.num_experts_per_tok or None,
      moe_intermediate_size=cfg.expert_intermediate_size if cfg.num_experts else None,
      hidden_size_per_layer_input=cfg.hidden_size_per_layer_input,
      vocab_size_per_layer_input=cfg.vocab_size_per_layer_input)


# ----- a sparse layer's tensors -----------------------------------------------------------------

def sparse_layer_specs(cfg: ModelConfig, i: int) -> Iterator[tuple[tuple[str, ...], str,
                                                                   tuple[int, ...]]]:
  """(param path, HF name, HF shape) of sparse layer i's router and its three extra norms (its
  dense MLP is the usual `mlp`)."""
  h, e, layer = cfg.hidden_size, cfg.num_experts, f"model.layers.{i}"
  yield ("router", "proj", "kernel"), f"{layer}.router.proj.weight", (e, h)
  yield ("router", "scale"), f"{layer}.router.scale", (h,)
  yield ("router", "per_expert_scale"), f"{layer}.router.per_expert_scale", (e,)
  for norm in ("pre_feedforward_layernorm_2", "post_feedforward_layernorm_1",
               "post_feedforward_layernorm_2"):
    yield (norm, "weight"), f"{layer}.{norm}.weight", (h,)


def sparse_layer_experts(cfg: ModelConfig, i: int) -> Iterator[ExpertSpec]:
  """Sparse layer i's experts (`experts/{gate,up,down}_proj`), saved fused as transformers does;
  one tensor per expert (`experts.{e}.{proj}.weight`, GPTQ exports' names) also loads."""
  return expert_specs(cfg, i, root=(), saved_fused=True)


def sparse_layer_groups(cfg: ModelConfig) -> tuple[tuple[tuple[str, ...], ...], ...]:
  """A sparse layer's true-sequential groups after attention: the dense MLP's gate / up, the
  router and the experts' gate / up (independent branches that all read the attention residual),
  then both down projections. The router stays float unless a dynamic rule names it."""
  del cfg  # the same for every Gemma 4 sparse layer
  return ((("mlp", "gate_proj"), ("mlp", "up_proj"), ("router", "proj"),
           ("experts", "gate_proj"), ("experts", "up_proj")),
          (("mlp", "down_proj"), ("experts", "down_proj")))

"""The supported families as small mappings: HF config.json <-> ModelConfig, HF tensor names <->
params, and the true-sequential groups of a block.

Every family runs on the one decoder in model.py; what differs is read from config.json into typed
ModelConfig fields here (and written back). The tensor names are the same for all families
(`model.layers.{i}.self_attn.q_proj.weight`, ...); which tensors exist follows the config fields
(biases, q/k norms, the four norms of a Gemma block, an untied lm_head, Gemma 4's per-layer
inputs and its layers without k/v projections).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

# `ModelConfig` in the annotations is models/config.py's (never evaluated: config.py imports this
# module, so this module imports only the field types it builds).
from gptq_jax.models import gemma4_family
from gptq_jax.models.config_fields import FULL, SLIDING, LayerKind, RopeScaling
from gptq_jax.models.gemma4_family import gemma4_from_hf, gemma4_problems, gemma4_to_hf
from gptq_jax.models.moe_families import (MOE_MODEL_TYPES, ExpertSpec, alternative_names,
                                          expert_specs, module_tensor_name, moe_config_json,
                                          moe_config_kwargs, moe_problems, sparse_groups,
                                          sparse_mlp_specs)

Spec = tuple[tuple[str, ...], str, tuple[int, ...]]  # (param path, HF tensor name, HF shape)
LinearPath = tuple[str, ...]

ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")

# True-sequential GPTQ order, the same for all five families (as GPTQModel's definitions): the
# projections that share an input are one group; q/k norms and biases are never quantized.
SEQUENTIAL_GROUPS: tuple[tuple[LinearPath, ...], ...] = (
    (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj")),
    (("self_attn", "o_proj"),),
    (("mlp", "gate_proj"), ("mlp", "up_proj")),
    (("mlp", "down_proj"),),
)


@dataclasses.dataclass(frozen=True)
class Family:
  model_type: str
  architecture: str  # the HF CausalLM class written to config.json
  default_tie: bool = False
  default_head_dim: int | None = None  # config.json without head_dim (None: hidden / heads)
  default_rope_theta: float = 10000.0


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM"),
    Family("mistral", "MistralForCausalLM"),
    Family("qwen2", "Qwen2ForCausalLM"),
    Family("qwen3", "Qwen3ForCausalLM", default_head_dim=128),
    Family("gemma3_text", "Gemma3ForCausalLM", default_tie=True, default_head_dim=256,
           default_rope_theta=1_000_000.0),
    Family("gemma4_text", "Gemma4ForCausalLM", default_tie=True, default_head_dim=256,
           default_rope_theta=1_000_000.0),
    Family("qwen3_moe", "Qwen3MoeForCausalLM"),
    Family("qwen2_moe", "Qwen2MoeForCausalLM"),
    Family("mixtral", "MixtralForCausalLM", default_rope_theta=1_000_000.0),
)}
_BY_ARCH = {f.architecture: f.model_type for f in FAMILIES.values()}


def _supported() -> str:
  return ", ".join(f"{f.model_type} ({f.architecture})" for f in FAMILIES.values())


def family_of(d: Mapping[str, Any]) -> Family:
  """The family of a config.json dict; a clear ValueError for any other model."""
  model_type = d.get("model_type")
  archs = list(d.get("architectures") or [])
  if model_type is None:
    known = [_BY_ARCH[a] for a in archs if a in _BY_ARCH]
    if archs and not known:
      raise ValueError(f"unsupported architecture {archs}: gptq_jax supports {_supported()}")
    model_type = known[0] if known else "llama"
  if model_type not in FAMILIES:
    hint = ""
    if model_type == "gemma4":
      hint = (" (this is the multimodal Gemma 4 config; gptq_jax reads the text model, "
              "model_type 'gemma4_text' / Gemma4ForCausalLM)")
    if model_type == "gemma3":
      hint = (" (this is the multimodal Gemma 3 config; gptq_jax reads the text model, "
              "model_type 'gemma3_text' / Gemma3ForCausalLM)")
    raise ValueError(f"unsupported architecture: model_type {model_type!r} (architectures={archs}){hint}; "
                     f"gptq_jax supports {_supported()}")
  family = FAMILIES[model_type]
  if archs and family.architecture not in archs:
    raise ValueError(f"unsupported architecture {archs} for model_type {model_type!r}: gptq_jax "
                     f"supports {_supported()}")
  return family


# ----- config.json -> ModelConfig -------------------------------------------------------------

def _rope_dicts(d: Mapping[str, Any]) -> tuple[dict, dict | None]:
  """(full-attention rope dict, sliding-attention rope dict or None) from rope_parameters /
  rope_scaling, whichever transformers version wrote the file."""
  rope = d.get("rope_parameters")
  local = None
  if isinstance(rope, Mapping) and (FULL in rope or SLIDING in rope):  # per layer type
    local = dict(rope.get(SLIDING) or {})
    rope = rope.get(FULL)
  full = dict(rope or {})
  if d.get("rope_scaling"):
    full.update(d["rope_scaling"])
  return full, local


def config_from_hf(cls, d: Mapping[str, Any]) -> ModelConfig:
  family = family_of(d)
  mt = family.model_type
  missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads") if k not in d]
  if missing:
    raise ValueError(f"config.json is missing required keys {missing}")
  n_layers = d["num_hidden_layers"]
  max_pos = d.get("max_position_embeddings", 2048)
  full, local = _rope_dicts(d)
  rope_theta = d.get("rope_theta") or full.get("rope_theta") or family.default_rope_theta
  kwargs: dict[str, Any] = dict(
      model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
      intermediate_size=d["intermediate_size"], num_hidden_layers=n_layers,
      num_attention_heads=d["num_attention_heads"],
      num_key_value_heads=d.get("num_key_value_heads"),
      head_dim=d.get("head_dim") or family.default_head_dim,
      rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(rope_theta),
      rope_scaling=RopeScaling.from_hf_dict(full, max_pos), max_position_embeddings=max_pos,
      tie_word_embeddings=bool(d.get("tie_word_embeddings", family.default_tie)),
      hidden_act=d.get("hidden_act") or "silu", bos_token_id=d.get("bos_token_id"),
      eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"))
  if mt == "llama":
    kwargs.update(attention_bias=bool(d.get("attention_bias", False)),
                  mlp_bias=bool(d.get("mlp_bias", False)))
  elif mt == "mistral":
    window = d.get("sliding_window")
    kwargs.update(sliding_window=window, layer_types=(SLIDING if window else FULL,) * n_layers)
  elif mt in ("qwen2", "qwen3"):
    window = d.get("sliding_window") if d.get("use_sliding_window") else None
    types = (FULL,) * n_layers
    if window:
      types = tuple(d.get("layer_types") or [
          SLIDING if i >= d.get("max_window_layers", 28) else FULL for i in range(n_layers)])
    kwargs.update(sliding_window=window, layer_types=types)
    if mt == "qwen2":
      kwargs.update(qkv_bias=True, o_bias=False)
    else:
      kwargs.update(attention_bias=bool(d.get("attention_bias", False)), qk_norm=True)
  elif mt == "gemma3_text":
    if d.get("use_bidirectional_attention"):
      raise ValueError("Gemma 3 with use_bidirectional_attention=True (an encoder setting) is not "
                       "supported: gptq_jax runs causal decoders")
    if d.get("attn_logit_softcapping") is not None:
      raise ValueError(f"Gemma 3 config sets attn_logit_softcapping={d['attn_logit_softcapping']}, "
                       "which transformers' Gemma 3 does not apply: gptq_jax does not support it "
                       "(set it to null)")
    pattern = d.get("sliding_window_pattern", 6)
    types = d.get("layer_types") or [
        SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]
    local = local or {}
    local_theta = local.get("rope_theta") or d.get("rope_local_base_freq") or 10000.0
    kwargs.update(
        attention_bias=bool(d.get("attention_bias", False)), qk_norm=True, norm_unit_offset=True,
        scale_embeddings=True, sandwich_norms=True,
        hidden_act=d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh",
        query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
        sliding_window=d.get("sliding_window", 4096), layer_types=tuple(types),
        rope_local_theta=float(local_theta),
        rope_local_scaling=RopeScaling.from_hf_dict(local, max_pos),
        final_logit_softcapping=d.get("final_logit_softcapping"))
  elif mt == "gemma4_text":
    kwargs.update(gemma4_from_hf(d, full, local, max_pos))
  elif mt in MOE_MODEL_TYPES:
    kwargs.update(moe_config_kwargs(d, n_layers))
  return cls(**kwargs)


# ----- ModelConfig -> config.json -------------------------------------------------------------

def _check_expressible(cfg: ModelConfig) -> None:
  """Refuses a config whose fields the family's transformers model cannot express."""
  mt = cfg.model_type
  gemma = mt in ("gemma3_text", "gemma4_text")
  problems = gemma4_problems(cfg)
  want = dict(qk_norm=mt in ("qwen3", "gemma3_text", "gemma4_text", "qwen3_moe"),
              norm_unit_offset=mt == "gemma3_text", scale_embeddings=gemma, sandwich_norms=gemma)
  problems += [f"{k}={getattr(cfg, k)}" for k, v in want.items() if getattr(cfg, k) != v]
  problems += moe_problems(cfg)
  if mt == "qwen2":
    if not (cfg.qkv_bias and not cfg.o_bias):
      problems.append("Qwen2 has q/k/v biases and no o_proj bias")
  elif mt == "qwen2_moe":
    if cfg.o_bias:
      problems.append("Qwen2-MoE has no o_proj bias")
  elif cfg.qkv_bias != cfg.o_bias:
    problems.append(f"qkv_bias={cfg.qkv_bias} with o_bias={cfg.o_bias}")
  if mt in ("mistral", "mixtral") and (cfg.qkv_bias or cfg.o_bias):
    problems.append("Mistral / Mixtral have no attention biases")
  if cfg.mlp_bias and mt != "llama":
    problems.append("mlp_bias (only Llama has it)")
  if cfg.attn_logit_softcapping is not None:
    problems.append("attn_logit_softcapping (no supported family's transformers model applies it)")
  if not gemma:
    if cfg.hidden_act != "silu":
      problems.append(f"hidden_act={cfg.hidden_act!r}")
    for k in ("query_pre_attn_scalar", "rope_local_theta", "final_logit_softcapping"):
      if getattr(cfg, k) is not None:
        problems.append(f"{k}={getattr(cfg, k)}")
  sliding = [i for i, t in enumerate(cfg.layer_types) if t == SLIDING]
  if mt == "llama" and sliding:
    problems.append("sliding-window layers (Llama has none)")
  if mt == "mistral" and sliding and len(sliding) != cfg.num_hidden_layers:
    problems.append("Mistral's sliding window applies to every layer")
  if mt in ("qwen2", "qwen3") and sliding and sliding != list(range(sliding[0], cfg.num_hidden_layers)):
    problems.append("Qwen's sliding layers are the last ones (from max_window_layers on)")
  if problems:
    raise ValueError(f"this ModelConfig cannot be written as a {FAMILIES[mt].architecture} "
                     f"config.json: {'; '.join(problems)}")


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  _check_expressible(cfg)
  family = FAMILIES[cfg.model_type]
  mt = cfg.model_type
  eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
  out: dict[str, Any] = {
      "architectures": [family.architecture],
      "model_type": mt,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_hidden_layers,
      "num_attention_heads": cfg.num_attention_heads,
      "num_key_value_heads": cfg.num_key_value_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": cfg.hidden_act,
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": cfg.rope_scaling.to_hf_dict() if cfg.rope_scaling else None,
      "max_position_embeddings": cfg.max_position_embeddings,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "attention_bias": cfg.attention_bias,
      "mlp_bias": cfg.mlp_bias,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": eos,
      "pad_token_id": cfg.pad_token_id,
  }
  sliding = [i for i, t in enumerate(cfg.layer_types) if t == SLIDING]
  if mt != "llama":
    del out["mlp_bias"]
  if mt == "mistral":
    del out["attention_bias"]
    out["sliding_window"] = cfg.sliding_window if sliding else None
  elif mt in ("qwen2", "qwen3"):
    if mt == "qwen2":
      del out["attention_bias"]
    out.update(use_sliding_window=bool(sliding and cfg.sliding_window),
               sliding_window=cfg.sliding_window if sliding else None,
               max_window_layers=sliding[0] if sliding else cfg.num_hidden_layers,
               layer_types=list(cfg.layer_types))
  elif mt == "gemma4_text":
    gemma4_to_hf(cfg, out)
  elif mt in MOE_MODEL_TYPES:
    moe_config_json(cfg, out)
  elif mt == "gemma3_text":
    del out["hidden_act"]
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta}
    if cfg.rope_local_scaling is not None:
      local = dict(cfg.rope_local_scaling.to_hf_dict(), rope_theta=cfg.rope_local_theta)
    full = dict(out["rope_scaling"] or {"rope_type": "default"}, rope_theta=cfg.rope_theta)
    del out["rope_scaling"]
    out.update(hidden_activation=cfg.hidden_act, query_pre_attn_scalar=cfg.query_pre_attn_scalar,
               sliding_window=cfg.sliding_window, layer_types=list(cfg.layer_types),
               rope_local_base_freq=cfg.rope_local_theta,
               rope_parameters={FULL: full, SLIDING: local},
               attn_logit_softcapping=None, final_logit_softcapping=cfg.final_logit_softcapping)
  return out


# ----- tensors --------------------------------------------------------------------------------

def _proj_shapes(cfg: ModelConfig, layer_type: str = FULL, kv_shared: bool = False
                 ) -> dict[str, tuple[int, int]]:
  """HF `[out, in]` shape of each projection a layer of this kind has (Gemma 4: per-type head
  sizes; no k/v projections on a K/V-sharing layer, no v_proj on a k_eq_v full layer)."""
  hd = cfg.layer_head_dim(layer_type)
  q, kv, h = cfg.num_attention_heads * hd, cfg.layer_kv_heads(layer_type) * hd, cfg.hidden_size
  m = cfg.layer_intermediate_size(kv_shared)
  out = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
         "gate_proj": (m, h), "up_proj": (m, h), "down_proj": (h, m)}
  if kv_shared or not cfg.layer_has_v_proj(layer_type):
    del out["v_proj"]
  if kv_shared:
    del out["k_proj"]
  return out


def block_norms(cfg: ModelConfig) -> tuple[str, ...]:
  """The hidden-size norms of a block, by their HF (and param) names."""
  if cfg.sandwich_norms:
    return ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
            "post_feedforward_layernorm") + (
                ("post_per_layer_input_norm",) if cfg.hidden_size_per_layer_input else ())
  return ("input_layernorm", "post_attention_layernorm")


def layer_tensor_specs(cfg: ModelConfig, i: int) -> Iterator[Spec]:
  """(param path in `layers_{i}`, HF tensor name, HF shape) for every tensor of layer i."""
  layer_type, kv_shared = cfg.layer_types[i], cfg.kv_shared(i)
  shapes = _proj_shapes(cfg, layer_type, kv_shared)
  bias = {"q_proj": cfg.qkv_bias, "k_proj": cfg.qkv_bias, "v_proj": cfg.qkv_bias,
          "o_proj": cfg.o_bias, **{p: cfg.mlp_bias for p in MLP_PROJS}}
  sparse = cfg.sparse_layer(i)
  beside = sparse and cfg.dense_mlp_beside_experts  # Gemma 4: the dense MLP stays
  for group, projs in (("self_attn", ATTN_PROJS),
                       ("mlp", () if sparse and not beside else MLP_PROJS)):
    for proj in (p for p in projs if p in shapes):
      name = f"model.layers.{i}.{group}.{proj}"
      yield (group, proj, "kernel"), f"{name}.weight", shapes[proj]
      if bias[proj]:
        yield (group, proj, "bias"), f"{name}.bias", shapes[proj][:1]
  if sparse:
    yield from (gemma4_family.sparse_layer_specs if beside else sparse_mlp_specs)(cfg, i)
  if cfg.qk_norm:
    for norm in ("q_norm",) if kv_shared else ("q_norm", "k_norm"):
      yield (("self_attn", norm, "weight"), f"model.layers.{i}.self_attn.{norm}.weight",
             (cfg.layer_head_dim(layer_type),))
  for norm in block_norms(cfg):
    yield (norm, "weight"), f"model.layers.{i}.{norm}.weight", (cfg.hidden_size,)
  p, h = cfg.hidden_size_per_layer_input, cfg.hidden_size
  if p:  # Gemma 4's per-layer input (models/gemma4.py)
    for proj, shape in (("per_layer_input_gate", (p, h)), ("per_layer_projection", (h, p))):
      yield (proj, "kernel"), f"model.layers.{i}.{proj}.weight", shape
  if cfg.layer_scalar:
    yield ("layer_scalar",), f"model.layers.{i}.layer_scalar", (1,)


def layer_expert_specs(cfg: ModelConfig, i: int) -> Iterator[ExpertSpec]:
  """The stacked expert params of layer i (none for a dense layer; moe_families.ExpertSpec)."""
  if cfg.sparse_layer(i):
    beside = cfg.dense_mlp_beside_experts
    yield from (gemma4_family.sparse_layer_experts if beside else expert_specs)(cfg, i)


def hf_names(cfg: ModelConfig, name: str) -> tuple[str, ...]:
  """`name` and the other names the same tensor may have on disk (tried in this order)."""
  return (name,) + alternative_names(cfg, name)


def nonlayer_tensor_specs(cfg: ModelConfig) -> Iterator[Spec]:
  """(param path, HF tensor name, HF shape) for the embedding, final norm and untied lm_head
  (and Gemma 4's per-layer input embedding, projection and norm)."""
  yield ("embed_tokens", "embedding"), "model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size)
  p, lp = cfg.hidden_size_per_layer_input, cfg.num_hidden_layers * cfg.hidden_size_per_layer_input
  if p:
    yield (("embed_tokens_per_layer", "embedding"), "model.embed_tokens_per_layer.weight",
           (cfg.vocab_size_per_layer_input, lp))
    yield (("per_layer_model_projection", "kernel"), "model.per_layer_model_projection.weight",
           (lp, cfg.hidden_size))
    yield ("per_layer_projection_norm", "weight"), "model.per_layer_projection_norm.weight", (p,)
  yield ("norm", "weight"), "model.norm.weight", (cfg.hidden_size,)
  if not cfg.tie_word_embeddings:
    yield ("lm_head", "kernel"), "lm_head.weight", (cfg.vocab_size, cfg.hidden_size)


def embedding_keys(cfg: ModelConfig) -> tuple[str, ...]:
  """The top-level params the first block's input is computed from (the token embedding, and
  Gemma 4's per-layer input embedding, projection and norm)."""
  extra = ("embed_tokens_per_layer", "per_layer_model_projection", "per_layer_projection_norm")
  return ("embed_tokens",) + (extra if cfg.hidden_size_per_layer_input else ())


def sequential_groups(cfg: ModelConfig, kind: LayerKind | None = None
                      ) -> tuple[tuple[LinearPath, ...], ...]:
  """The true-sequential groups of a block of this kind (default: a dense full-attention block
  with its own K/V): the attention's (without the projections a Gemma 4 layer lacks), then the
  MLP's (a sparse block's: moe_families.sparse_groups), then Gemma 4's per-layer input gate and
  projection (as GPTQModel's Gemma 4 definition orders them; each reads what the one before it
  wrote)."""
  kind = LayerKind() if kind is None else kind
  present = _proj_shapes(cfg, kind.attention, kind.kv_shared)
  attention = tuple(g for g in (tuple(p for p in group if p[1] in present)
                                for group in SEQUENTIAL_GROUPS[:2]) if g)
  mlp = SEQUENTIAL_GROUPS[2:]
  if kind.sparse:
    beside = cfg.dense_mlp_beside_experts
    mlp = (gemma4_family.sparse_layer_groups if beside else sparse_groups)(cfg)
  groups = attention + mlp
  if cfg.hidden_size_per_layer_input:
    groups += ((("per_layer_input_gate",),), (("per_layer_projection",),))
  return groups


__all__ = ["FAMILIES", "Family", "SEQUENTIAL_GROUPS", "block_norms", "config_from_hf",
           "config_to_hf", "embedding_keys", "family_of", "hf_names", "layer_expert_specs",
           "layer_tensor_specs", "module_tensor_name", "nonlayer_tensor_specs", "sequential_groups"]

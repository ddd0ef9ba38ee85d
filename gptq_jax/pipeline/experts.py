"""Mixture-of-experts layers in the block-sequential driver: per-expert Hessians and solves.

Each expert's gate / up / down projection is its own GPTQ problem, with a Hessian from exactly
the calibration tokens routed to it (capture.py: ``2 / n_e X_e^T X_e`` over the rows of expert
``e``; routing weights scale neither input, as in GPTQModel and transformers, where they multiply
the expert's output). The experts of a layer have the same shapes, so they are solved together
(``core.batched``: one vmapped factorization and column loop, the codes of one solve per expert).

* Few-token experts: an expert that receives fewer than ``cfg.fallback_threshold`` of the
  calibration tokens (GPTQModel's ``Fallback`` default, 0.5 %), and always one that receives
  none, is quantized by round-to-nearest; the report says so (``fallback``, ``few_tokens``) and
  gives every expert's token count.
* Routing during calibration (``cfg.moe_routing``): "native", "all" (every expert sees every
  token: GPTQModel's ``ExpertsRoutingBypass``) or "topk:N" (``ExpertsRoutingOverride``). It
  applies to the Hessian passes only; the block outputs passed on to the next block use the
  model's own routing (GPTQModel's replay forwards do the same).
* The router (``mlp.gate``, Gemma 4's ``router.proj``) and a shared-expert gate stay float
  unless a ``dynamic`` "+:" rule names them; every expert of a projection must resolve to the
  same ``dynamic`` settings (they are stored stacked).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from gptq_jax.config import GPTQConfig, routing_topk
from gptq_jax.core.batched import quantize_batched
from gptq_jax.models.moe_families import FLOAT_BY_DEFAULT
from gptq_jax.pipeline import dynamic
from gptq_jax.pipeline.adapter import get_path, set_path

LayerConfig = Callable[[str], "GPTQConfig | None"]


def float_by_default(path: tuple[str, ...]) -> bool:
  """The router and a shared-expert gate: left in float unless a dynamic rule names them."""
  return tuple(path) in FLOAT_BY_DEFAULT


def is_expert_path(path: tuple[str, ...]) -> bool:
  return len(path) >= 2 and path[-2] == "experts"


def expert_name(i: int, path: tuple[str, ...], e: int, hf: bool = True) -> str:
  """``model.layers.{i}.mlp.experts.{e}.gate_proj`` (``hf=False``: the report's ``layers.{i}...``)."""
  name = dynamic.module_name(i, path[:-1] + (str(e), path[-1]))
  return name if hf else name[len("model."):]


def expert_config(cfg: GPTQConfig, i: int, path: tuple[str, ...], num_experts: int,
                  layer_config: LayerConfig | None = None) -> GPTQConfig | None:
  """The one config every expert of this projection resolves to; a clear error when they
  differ (experts are stored stacked, so they share bits and groups)."""
  if layer_config is None:
    configs = {dynamic.resolve(cfg, expert_name(i, path, e)) for e in range(num_experts)}
  else:
    configs = {layer_config(expert_name(i, path, e, hf=False)) for e in range(num_experts)}
  if len(configs) > 1:
    raise ValueError(f"the dynamic rules give the experts of model.layers.{i}.{'.'.join(path)} "
                     "different settings; experts of one projection are stored stacked: give "
                     "all of them the same rule (or leave all in float)")
  return configs.pop()


def check_model(cfg: GPTQConfig, model_config: Any, layer_config: LayerConfig | None) -> None:
  """Refuses, before any work, what mixture-of-experts quantization does not support."""
  if not getattr(model_config, "num_experts", 0):
    if cfg.moe_routing != "native":
      raise ValueError(f"moe_routing={cfg.moe_routing!r} needs a mixture-of-experts model; this "
                       "one is dense")
    return
  for what, on in (("gptaq", cfg.gptaq), ("rotation", cfg.rotation != "none"),
                   ("refine_steps", cfg.refine_steps)):
    if on:
      raise ValueError(f"{what} is not supported for mixture-of-experts models "
                       f"({model_config.model_type}): quantize without it")
  from gptq_jax.models.families import layer_expert_specs  # noqa: PLC0415

  for i in range(model_config.num_hidden_layers):
    for spec in layer_expert_specs(model_config, i):  # ("mlp", "experts", "gate_proj", "kernel")
      expert_config(cfg, i, spec.path[:-1], model_config.num_experts, layer_config)


def calibration_adapter(blk: Any, cfg: GPTQConfig) -> Any:
  """The adapter of the Hessian passes: ``blk`` with ``cfg.moe_routing``'s experts per token."""
  kind = getattr(blk, "kind", None)
  if cfg.moe_routing == "native" or kind is None or not kind.sparse:
    return blk
  top_k = routing_topk(cfg.moe_routing, blk.config.num_experts)
  return type(blk).for_config(blk.config.replace(num_experts_per_tok=top_k), kind)


def fallback_mask(counts: np.ndarray, total_tokens: float, cfg: GPTQConfig) -> np.ndarray:
  """Experts quantized by round-to-nearest: fewer than ``fallback_threshold`` of the calibration
  tokens (GPTQModel's rule: ``observed < threshold``), and always those that received none."""
  return (counts < cfg.fallback_threshold * total_tokens) | (counts <= 0)


def quantize_expert_sets(capture, block, work, paths, configs, i: int, progress, records: list,
                         total_tokens: float, spread=None):
  """Quantize the expert projections ``paths`` of block ``i`` (those sharing an input and a
  config solved in one batch) -> (block, work)."""
  sets: dict[tuple, list[int]] = {}
  for k, path in enumerate(paths):
    if configs[k] is not None:
      sets.setdefault((capture.alias.get(path, path), configs[k]), []).append(k)
  for (rep, c), ks in sets.items():
    t0 = time.perf_counter()
    H, counts = capture.expert_hessians(rep)
    counts = np.asarray(counts)
    E = counts.shape[0]
    rtn = fallback_mask(counts, total_tokens, c)
    label = "+".join(".".join(paths[k][1:]) for k in ks)
    shown = lambda done, E=E, label=label: progress.update(  # noqa: E731
        i, label, None, experts=(done, E))
    kernels = [get_path(block, paths[k])["kernel"] for k in ks]
    names = [expert_name(i, paths[ks[0]], e) for e in range(E)]
    results = quantize_batched(kernels, H, c, names, rtn=rtn, mesh=spread, on_chunk=shown)
    capture.release(rep)
    seconds = (time.perf_counter() - t0) / (E * len(ks))
    for k, kernel, (qw, infos) in zip(ks, kernels, results):
      packed = qw.pack(c.format)
      block = set_path(block, paths[k] + ("kernel",), packed)
      if work is not None:
        work = set_path(work, paths[k] + ("kernel",), packed.dequantize(kernel.dtype))
      for e, info in enumerate(infos):
        records.append({"block": i, "layer": expert_name(i, paths[k], e, hf=False),
                        "shape": list(kernel.shape[1:]), "loss": info.loss, "damp": info.damp,
                        "fallback": info.fallback, "few_tokens": bool(rtn[e]),
                        "tokens": int(counts[e]), "expert": e, "seconds": seconds,
                        "solved_with": E * len(ks)})
      losses = [x.loss for x in infos if np.isfinite(x.loss)]
      progress.update(i, ".".join(paths[k][1:]), max(losses) if losses else None, experts=(E, E))
  return block, work


def block_module_names(model_config: Any, cfg: GPTQConfig) -> list[list[str]]:
  """The quantized linears of every block, by true-sequential group, as names inside a block
  (``self_attn.q_proj``, ``mlp.experts.3.gate_proj``, ...): the ``modules_in_block_to_quantize``
  of a mixture-of-experts export, so that loaders leave the float router / shared-expert gate
  alone (Optimum would otherwise make every ``nn.Linear`` of a block a quantized one)."""
  from gptq_jax.models.families import sequential_groups  # noqa: PLC0415

  groups: dict[int, list[str]] = {}
  for i, kind in enumerate(model_config.layer_kinds):
    for g, group in enumerate(sequential_groups(model_config, kind)):
      for path in group:
        per = ([path[:-1] + (str(e), path[-1]) for e in range(model_config.num_experts)]
               if is_expert_path(path) else [path])
        for p in per:
          name = dynamic.module_name(i, p)
          c = (dynamic.resolve(cfg, name, unmatched=None) if float_by_default(p)
               else dynamic.resolve(cfg, name))
          if c is not None and ".".join(p) not in groups.setdefault(g, []):
            groups[g].append(".".join(p))
  return [groups[g] for g in sorted(groups)]

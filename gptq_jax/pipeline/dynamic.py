"""Per-module precision (GPTQModel's ``dynamic``) and the quantized output projection (``lm_head``).

``dynamic`` maps regex patterns to overrides; modules are named as in Hugging Face checkpoints
(``model.layers.3.mlp.down_proj``, ``lm_head``). Rules are tried in their order and the first whose
pattern matches the *start* of the name decides (``re.match``, as GPTQModel): a ``-:<regex>`` rule
leaves the module in float, a ``+:<regex>`` (or bare) rule overrides bits / group_size / sym /
desc_act / mse for it; a module no rule matches uses the base config. See docs/format.md.

``lm_head=True`` quantizes the output projection after the last block, with GPTQ on the final
norm's outputs (the projection's real inputs). A tied embedding is untied first: the embedding
stays float, the projection becomes its own (quantized) ``lm_head`` and the model config says
``tie_word_embeddings=False``.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gptq_jax.config import GPTQConfig, module_config
from gptq_jax.core import hessian
from gptq_jax.models.params import untied
from gptq_jax.pipeline import multihost
from gptq_jax.pipeline.capture import local_copy, scan_samples

LM_HEAD = "lm_head"


def module_name(i: int, path: tuple[str, ...]) -> str:
  """The Hugging Face name of linear ``path`` of block ``i`` (what ``dynamic`` patterns match)."""
  return f"model.layers.{i}." + ".".join(path)


_BASE = object()


def resolve(cfg: GPTQConfig, name: str, unmatched: Any = _BASE) -> GPTQConfig | None:
  """The config module ``name`` is quantized with, or None when a ``-:`` rule leaves it float.
  ``unmatched``: what a module no rule matches gets (default ``cfg``; None keeps a module that
  is float by default, a mixture-of-experts router, float unless a rule names it)."""
  for pattern, overrides in cfg.dynamic or ():
    negative = pattern.startswith("-:")
    raw = pattern[2:] if pattern.startswith(("+:", "-:")) else pattern
    if re.match(raw, name):
      if negative:
        return None
      return module_config(cfg, dict(overrides)) if overrides else cfg
  return cfg if unmatched is _BASE else unmatched


def lm_head_statistics(model_config: Any, params: Any, hidden: list, masks: list,
                       mesh: Any = None, axis_name: str = "data",
                       float_hidden: list | None = None) -> tuple[jax.Array, jax.Array | None]:
  """``(H, dXXT)`` of the final norm's outputs over the unmasked calibration tokens, on this
  process's first device: ``H = 2/n X^T X`` (each sample's product on its own, per device of
  ``mesh``'s data axis, as the blocks' Hessians: core/hessian.py) and, with ``float_hidden`` (the
  float model's last block outputs: GPTAQ), ``dXXT = 2/n (X_float - X)^T X``, else None."""
  from gptq_jax.models import model as model_lib  # noqa: PLC0415

  norm = lambda p, h: model_lib.CausalLM(model_config).apply({"params": p}, h,
                                                             method=lambda m, x: m.norm(x))
  cross = float_hidden is not None

  def local(state, p, h, mask, fh):
    mine = multihost.own(state) if mesh is not None else state
    if cross:
      body = lambda st, hk, mk, fk: (hessian.cross_add(st, norm(p, hk), norm(p, fk), mk), None)
    else:
      body = lambda st, hk, mk, fk: (hessian.add(st, norm(p, hk), mk), None)
    mine, _ = scan_samples(body, mine, h, mask, fh)
    return multihost.stacked(mine) if mesh is not None else mine

  state = (hessian.cross_init if cross else hessian.init)(model_config.hidden_size)
  if mesh is not None:
    data = P(axis_name)
    local = jax.shard_map(local, mesh=mesh, in_specs=(data, P(), data, data, data),
                          out_specs=data)
    state = multihost.per_device_zeros(mesh, axis_name, state)
    final = multihost.replicate(mesh, {"norm": params["norm"]})
  else:
    final = {"norm": params["norm"]}  # all the final norm reads
  step = jax.jit(local, donate_argnums=0)
  for k, (h, mask) in enumerate(zip(hidden, masks)):
    state = step(state, final, h, mask, float_hidden[k] if cross else h)
  state = multihost.combined(mesh, axis_name, state)
  if cross:
    H, dxxt = hessian.finalize_cross(state)
    return local_copy(H), local_copy(dxxt)
  return local_copy(hessian.finalize(state)), None


def lm_head_hessian(model_config: Any, params: Any, hidden: list, masks: list,
                    mesh: Any = None, axis_name: str = "data") -> jax.Array:
  """``2/n X^T X`` of the final norm's outputs (``lm_head_statistics``' H)."""
  return lm_head_statistics(model_config, params, hidden, masks, mesh, axis_name)[0]


def quantize_lm_head(model_config: Any, params: Any, hidden: list, masks: list, cfg: GPTQConfig,
                     records: list[dict] | None = None, slices: tuple | None = None,
                     mesh: Any = None, axis_name: str = "data",
                     float_hidden: list | None = None) -> Any:
  """``params`` with ``lm_head.kernel`` GPTQ-quantized (packed in ``cfg.format``), or unchanged
  when ``dynamic`` leaves ``lm_head`` in float. ``hidden``: the last block's outputs; with GPTAQ,
  ``float_hidden``: the float model's (its cross-term, as for every other linear).

  ``slices``: ``(chunks, columns)`` to read the projection a slice of the vocabulary at a time
  (``columns(lo, hi) -> [hidden, hi - lo]``, a model streamed from disk): each slice is solved
  on its own (GPTQ's output columns are independent given H and the cross-term, core/shared.py)
  and packed on the host, so the float projection is never whole in memory. Default: ``params``'
  own kernel."""
  from gptq_jax.core.gptq import quantize_weight  # noqa: PLC0415
  from gptq_jax.core.weights import concat_columns  # noqa: PLC0415

  head_cfg = resolve(cfg, LM_HEAD)
  if head_cfg is None:
    return params
  if slices is None:
    if getattr(model_config, "tie_word_embeddings", False):
      kernel = jnp.asarray(params["embed_tokens"]["embedding"]).T  # [hidden, vocab]
    else:
      kernel = params[LM_HEAD]["kernel"]
    slices = ([(0, kernel.shape[1])], lambda lo, hi: kernel)
  chunks, columns = slices
  H, cross = lm_head_statistics(model_config, params, hidden, masks, mesh, axis_name,
                                float_hidden if head_cfg.gptaq else None)
  pieces, loss, infos = [], 0.0, []
  for lo, hi in chunks:
    qw, info = quantize_weight(columns(lo, hi), H, head_cfg, return_info=True, name=LM_HEAD,
                               cross=cross)
    pieces.append(qw.pack(head_cfg.format) if len(chunks) == 1 else
                  jax.device_get(qw.pack(head_cfg.format)))
    loss, infos = loss + info.loss, infos + [info]
  packed = pieces[0] if len(pieces) == 1 else concat_columns(pieces)
  if records is not None:
    records.append({"block": model_config.num_hidden_layers, "layer": LM_HEAD,
                    "shape": [H.shape[0], chunks[-1][1] - chunks[0][0]], "loss": loss,
                    "damp": max(i.damp for i in infos),
                    "fallback": any(i.fallback for i in infos)})
  out = {**params, LM_HEAD: {"kernel": packed}}
  if hasattr(params, "with_config"):  # ModelParams: the config it carries is untied too
    return type(params)(out, untied(model_config, out))
  return out

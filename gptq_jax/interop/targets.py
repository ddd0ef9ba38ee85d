"""``--target``: check a configuration against one serving engine before any work, name the
single flag that fixes a refusal, and pick ``--group-size auto`` (rules: engines.py)."""

from __future__ import annotations

from gptq_jax.config import GPTQConfig
from gptq_jax.interop import compressed_tensors as ct
from gptq_jax.interop.engines import CT, ENGINES, GPTQ, facts_for
from gptq_jax.models.config import ModelConfig

TARGETS = {
    "vllm": {GPTQ: ("vLLM Marlin (GPU)",), CT: ("vLLM Marlin (GPU)",)},
    "tpu-inference": {GPTQ: ("tpu-inference (TPU)",), CT: ("tpu-inference (TPU)",)},
    "transformers": {GPTQ: ("transformers + GPTQModel (CPU)", "transformers + GPTQModel (GPU)"),
                     CT: ("transformers + compressed-tensors",)},
}
AUTO_GROUP_SIZES = (128, 64, 32)
_RULES = {e.name: e.rule for e in ENGINES}


def target_refusal(model_config: ModelConfig, cfg: GPTQConfig, target: str,
                   hf_format: str = GPTQ) -> str | None:
  """None when every engine of ``target`` runs the export of ``cfg``, else the first reason."""
  if target not in TARGETS:
    raise ValueError(f"target={target!r} is not allowed: use one of {tuple(TARGETS)}")
  if hf_format == CT:
    try:
      ct.check_expressible(model_config, cfg)
    except ValueError as e:
      return str(e)
  facts = facts_for(model_config, cfg, hf_format)
  for engine in TARGETS[target][hf_format]:
    why = _RULES[engine](facts)
    if why:
      return f"{engine}: {why}"
  return None


def _fixes(cfg: GPTQConfig, hf_format: str):
  """Single-setting changes to try, as (flag, config, format)."""
  for g in AUTO_GROUP_SIZES:
    if g != cfg.group_size:
      yield f"--group-size {g}", cfg.replace(group_size=g), hf_format
  if not cfg.sym:
    yield "--sym", cfg.replace(sym=True), hf_format
  if cfg.desc_act and not cfg.static_groups and cfg.group_size != -1:  # keeps the act order
    yield "--static-groups", cfg.replace(static_groups=True), hf_format
  if cfg.desc_act:
    yield "--no-desc-act", cfg.replace(desc_act=False), hf_format
  if cfg.bits != 4:
    yield "--bits 4", cfg.replace(bits=4), hf_format
  other = CT if hf_format == GPTQ else GPTQ
  yield f"--hf-format {other}", cfg, other


def suggest(model_config: ModelConfig, cfg: GPTQConfig, target: str, hf_format: str = GPTQ
            ) -> str | None:
  """The first single flag change that makes ``target`` run the export, or None."""
  for flag, changed, fmt in _fixes(cfg, hf_format):
    if target_refusal(model_config, changed, target, fmt) is None:
      return flag
  return None


def auto_group_size(model_config: ModelConfig, cfg: GPTQConfig, target: str,
                    hf_format: str = GPTQ) -> int:
  """``--group-size auto``: the largest of 128, 64, 32 that ``target`` runs (ValueError if none)."""
  for g in AUTO_GROUP_SIZES:
    if target_refusal(model_config, cfg.replace(group_size=g), target, hf_format) is None:
      return g
  why = target_refusal(model_config, cfg.replace(group_size=AUTO_GROUP_SIZES[-1]), target,
                       hf_format)
  raise ValueError(f"--group-size auto: no group size in {AUTO_GROUP_SIZES} makes --target "
                   f"{target} run it ({why})")

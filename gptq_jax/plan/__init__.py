"""Plans for TPU slices: a run's programs compiled with its real shapes and no weights (libtpu's
compile-only client, or the attached devices), read for HBM per chip, host memory and time at the
roofline (docs/tpu.md). Sits above the pipeline: it compiles the pipeline's own programs."""

from gptq_jax.plan.chips import CHIPS, Chip
from gptq_jax.plan.layout import RunSettings
from gptq_jax.plan.planner import plan_quantization
from gptq_jax.plan.slices import Slice, attached, compile_only

__all__ = ["CHIPS", "Chip", "RunSettings", "Slice", "attached", "compile_only",
           "plan_quantization"]

"""Running packed GPTQ weights: the XLA path, the Pallas kernels (TPU / GPU), and their wrapper."""

from gptq_jax.kernels.block_sizes import BlockSizes
from gptq_jax.kernels.linear import apply_linear, is_quantized
from gptq_jax.kernels.prepare import PreparedWeight, prepare_for_kernel, prepare_params
from gptq_jax.kernels.quantized_matmul import BACKENDS, can_use_kernel, quantized_matmul
from gptq_jax.kernels.reference import reference_matmul

__all__ = [
    "BACKENDS", "BlockSizes", "PreparedWeight", "apply_linear", "can_use_kernel", "is_quantized",
    "prepare_for_kernel", "prepare_params", "quantized_matmul", "reference_matmul",
]

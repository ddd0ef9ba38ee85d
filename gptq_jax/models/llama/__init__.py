"""Compatibility alias: the decoder now lives in `gptq_jax.models` (one decoder for every family)."""

from gptq_jax.models import *  # noqa: F401,F403
from gptq_jax.models import __all__  # noqa: F401

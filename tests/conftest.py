"""Test setup: 8 host devices for the sharding tests (set before jax is imported), and the
session fixtures of the real SmolLM2-135M."""

from __future__ import annotations

import os

from tests.xla_env import FUSION_EMITTERS_OFF, NO_OPT_ENV  # noqa: E402 (see tests/xla_env.py)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count=8 {FUSION_EMITTERS_OFF}"
                           ).strip()
os.environ[NO_OPT_ENV] = "1"  # most optimizations off (subprocesses inherit it)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLIs' main() runs in-process in some tests: keep the persistent compilation cache out of this
# process (writing 8-device shard_map executables to it crashed jaxlib on CPU; cached programs
# also skip the compile events that the compile-count tests read). Subprocess tests that exercise
# the cache drop this variable from their environment.
os.environ["GPTQ_JAX_NO_COMPILE_CACHE"] = "1"

# Session fixtures shared by tests/models and tests/pipeline: the real SmolLM2-135M (loaded once),
# its tokenizer, a transformers twin.
import gc

import numpy as np
import pytest


# The longest test files (seconds of a two-worker run on the 2-core machine), run first: with
# `--dist loadfile` each worker takes the next file in collection order when it is free, so a long
# file collected last (tests/tpu/ sorts last) ran alone at the end of the run. Longest first
# leaves the workers finishing together; the other files keep their order.
LONGEST_FIRST = (
    "tests/models/gemma3_270m_test.py",  # 239 s
    "tests/pipeline/refine_test.py",  # 156 s
    "tests/tpu/compile_test.py",  # 155 s (a .venv-tpu subprocess compiling for TPU slices)
    "tests/cli/multihost_test.py",  # 128 s
    "tests/notebook_test.py",  # 95 s
    "tests/interop/families_test.py",  # 95 s
    "tests/interop/gemma4_test.py",  # 93 s
    "tests/cli/quantize_test.py",  # 78 s
    "tests/interop/moe_test.py",  # 75 s
    "tests/models/smollm2_test.py",  # 66 s
    "tests/cli/flags_test.py",  # 65 s
    "tests/models/decode_test.py",  # 61 s
    "tests/cli/streaming_test.py",  # 60 s
    "tests/distributed/multihost_test.py",  # 58 s
    "tests/cli/damaged_inputs_test.py",  # 54 s
    "tests/interop/gptqmodel_test.py",  # 51 s
)


def pytest_configure(config):
  """Keep the order above under ``--dist loadfile``: pytest-xdist otherwise reorders the files by
  their number of tests (``--loadscope-reorder``, on by default), which sent the long files with
  one to three tests (the notebook, the multi-process and TPU compile tests) to the end of the run,
  one worker idle beside them."""
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
  key = lambda item: rank.get(os.path.relpath(str(item.path), root), len(rank))  # noqa: E731
  items.sort(key=key)  # stable: the order inside a file and among the rest is kept


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
  """Free every compiled program after a test module once this process holds many memory maps.
  Each XLA:CPU executable keeps a few memory mappings of JIT code; one process running the whole
  suite compiles thousands of programs and passed the kernel's default limit of 65,530 mappings
  (vm.max_map_count), after which LLVM crashed with a segfault while compiling. Below
  ``MAX_MAPS`` maps and ``MAX_RSS_GIB`` of resident memory the programs stay: later modules
  reuse what earlier ones compiled (the SmolLM2 forward, the tiny models' solves)."""
  yield
  if _map_count() < MAX_MAPS and _rss_gib() < MAX_RSS_GIB:
    return
  import jax  # noqa: PLC0415

  jax.clear_caches()
  gc.collect()


MAX_MAPS = 30000  # under half the kernel's default vm.max_map_count (65,530)
MAX_RSS_GIB = 6.0  # and the programs' constants and buffers stay small beside the machine's memory


def _rss_gib() -> float:
  try:
    with open("/proc/self/status") as f:
      kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 2**20
  except (OSError, StopIteration):
    return MAX_RSS_GIB


def _map_count() -> int:
  try:
    with open("/proc/self/maps", "rb") as f:
      return sum(1 for _ in f)
  except OSError:  # not Linux: keep the old behaviour (drop after every module)
    return MAX_MAPS


@pytest.fixture(scope="session")
def smollm2():
  """(cfg, params) of the embedded SmolLM2-135M (dequantized GGUF, float32)."""
  from gptq_jax.models import load_llama

  return load_llama("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
  from gptq_jax.models import load_tokenizer

  return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_torch(smollm2):
  """transformers' LlamaForCausalLM (torch fp32) holding the same SmolLM2 weights."""
  import torch
  import transformers

  from gptq_jax.models import to_hf_state_dict

  cfg, params = smollm2
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf_dict())).eval()
  state = {k: torch.from_numpy(np.array(v)) for k, v in to_hf_state_dict(cfg, params).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
  return model


@pytest.fixture(scope="session")
def sotu_eval_tokens(smollm2_tokenizer):
  from gptq_jax.data import sotu_texts, tokenize_text

  return tokenize_text(sotu_texts("eval"), smollm2_tokenizer)

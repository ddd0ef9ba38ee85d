"""The real-size plans of tests/tpu (Llama-3-8B, Llama-3-70B) and the compiler figures they read.

Compiling a real-size model's programs for a TPU slice costs minutes of CPU each, so the tests
lower every program (cheap) and read its figures from ``compiler_figures.json`` beside this file,
compiling nothing (``measure.use_figures_file(strict=True)``). The file is keyed by the SHA-256 of
each lowered module, the slice and the jax / libtpu versions (``gptq_jax/plan/measure.py``): when a
program, the slice or the compiler changes, the test fails with one line saying so and naming the
command that records the file again:

  .venv-tpu/bin/python -m tests.tpu.real_size

(run from the repo root; it compiles only the programs the file does not hold, keeps only those
the plans use, and prints each compilation with ``GPTQ_JAX_PLAN_LOG=1``). The versions are pinned
for the venvs by ``scripts/constraints.txt``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

FIGURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compiler_figures.json")
RECORD = ".venv-tpu/bin/python -m tests.tpu.real_size"
LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
                 hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 torch_dtype="bfloat16")
# Llama-3-70B: the published sizes (hidden 8192, MLP 28672, 80 layers, 64 heads, 8 KV heads)
LLAMA3_70B = dict(LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                  num_attention_heads=64)
MODELS = {"8b": LLAMA3_8B, "70b": LLAMA3_70B}
# (model, slice, extra plan.py flags): two plans that fit, and one refused with the setting to change
PLANS = (("8b", "v5e:2x4", ()), ("70b", "v6e:2x4", ()),
         ("70b", "v5e:2x2", ("--seqlen", "8192", "--batch-size", "64")))


def write_configs(root: str) -> dict[str, str]:
  """One folder per model holding its config.json; {model: folder}."""
  folders = {}
  for name, cfg in MODELS.items():
    folders[name] = os.path.join(root, name)
    os.makedirs(folders[name], exist_ok=True)
    with open(os.path.join(folders[name], "config.json"), "w") as f:
      json.dump(cfg, f)
  return folders


def tasks(folders: dict[str, str]) -> list[str]:
  """The worker's tasks (tests/tpu/worker.py ``big``) of the plans."""
  return ["|".join(("big", folders[model], topology) + extra) for model, topology, extra in PLANS]


def record(path: str = FIGURES) -> None:
  """Plan every real-size case, compiling what ``path`` lacks, and write back only the figures
  the plans used."""
  import shutil  # noqa: PLC0415

  from gptq_jax.plan import measure  # noqa: PLC0415
  from tests.tpu import worker  # noqa: PLC0415

  used: dict = {}
  with tempfile.TemporaryDirectory() as tmp:
    cache = os.path.join(tmp, "figures.json")  # read as a cache, grown as programs compile
    if os.path.isfile(path):
      shutil.copy(path, cache)
    os.environ["GPTQ_JAX_PLAN_FIGURES"] = cache
    os.environ.pop("GPTQ_JAX_PLAN_FIGURES_STRICT", None)
    for task in tasks(write_configs(tmp)):
      _, folder, topology, *extra = task.split("|")
      plan = worker.big(folder, topology, *extra)
      used.update(measure.figures_used())
      print(f"{os.path.basename(folder)} on {topology} {' '.join(extra)}: fits={plan['fits']}, "
            f"peak {plan['hbm_peak_bytes_per_chip'] / 2**30:.2f} GiB per chip", flush=True)
  tmp_path = f"{path}.tmp{os.getpid()}"
  with open(tmp_path, "w") as f:
    json.dump(used, f, indent=0, sort_keys=True)
  os.replace(tmp_path, path)
  print(f"wrote {len(used) - 1} programs' figures ({used[measure.META]}) to {path}")


if __name__ == "__main__":
  record(*sys.argv[1:])

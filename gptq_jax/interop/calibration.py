"""What the calibration data was, said without local paths (for ``quantization_config.meta``).

``quantization_config.dataset`` may only hold what transformers, GPTQModel, vLLM and SGLang accept:
a named set (``wikitext2``, ``c4``, ``c4-new``), a list of strings, or null. A local file is none of
these, and its path would leak the quantizing machine's layout into a shared artifact, so the
export writes ``dataset: null`` and describes the source here instead: its kind, its size and a
SHA-256 of its content (enough to tell whether two checkpoints saw the same data).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from gptq_jax.config import NAMED_DATASETS


def hf_dataset(dataset: Any) -> str | list[str] | None:
  """The ``quantization_config.dataset`` value for a ``GPTQConfig.dataset``: a named set or a list
  of strings as is; anything else (a path) becomes None."""
  if isinstance(dataset, str) and dataset in NAMED_DATASETS:
    return dataset
  if isinstance(dataset, (list, tuple)) and all(isinstance(s, str) for s in dataset):
    return list(dataset)
  return None


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def describe_default(nsamples: int, seqlen: int) -> dict[str, Any]:
  """The command-line default: the bundled State of the Union addresses 1990-2015."""
  from gptq_jax import data  # noqa: PLC0415

  return {"nsamples": nsamples, "seqlen": seqlen, "sha256": _sha(data.sotu_texts("calib").encode()),
          "source": f"bundled State of the Union addresses 1990-2015 ({nsamples} samples of "
                    f"{seqlen} tokens)"}


def describe(dataset: Any, nsamples: int, seqlen: int) -> dict[str, Any]:
  """``{"source": <kind and size, no path>, "sha256": <content hash>, "nsamples", "seqlen"}``."""
  from gptq_jax import data  # noqa: PLC0415 (tokenizer-free readers only)

  out: dict[str, Any] = {"nsamples": nsamples, "seqlen": seqlen}
  windows = f"{nsamples} samples of {seqlen} tokens"
  if dataset is None:  # token batches handed to quantize(): nothing says where they came from
    out.update(source=f"token batches given to gptq_jax.quantize ({windows} configured)")
  elif isinstance(dataset, str) and dataset in NAMED_DATASETS:
    out.update(source=f"named dataset {dataset} ({windows})")
  elif isinstance(dataset, (list, tuple)):
    out.update(source=f"list of {len(dataset)} strings ({windows})",
               sha256=_sha("\0".join(dataset).encode()))
  elif isinstance(dataset, str) and dataset.endswith(".npy") and os.path.isfile(dataset):
    import numpy as np  # noqa: PLC0415

    shape = list(np.load(dataset, mmap_mode="r", allow_pickle=False).shape)
    with open(dataset, "rb") as f:
      out.update(source=f"token array {shape} (.npy, used as is)", sha256=_sha(f.read()))
  elif isinstance(dataset, str) and os.path.exists(dataset):
    kind = "text file" if os.path.isfile(dataset) else (
        f"folder of {sum(n.endswith('.txt') for n in os.listdir(dataset))} text files")
    out.update(source=f"{kind} ({windows})", sha256=_sha(data.read_text(dataset).encode()))
  else:
    out.update(source="unknown")
  return out

"""Calibration and evaluation tokens: named sets (Optimum's recipes), text files, strings, arrays.

`get_calib_batches` returns a list of `{"input_ids": int32 [batch, seqlen], "attention_mask": int32
[batch, seqlen]}` numpy dicts. The recipes follow huggingface/optimum `optimum/gptq/data.py`:
- wikitext2: wikitext-2-raw-v1 train, first 1000 rows ("" rows as " \\n") joined, tokenized once,
  `nsamples` random windows of `seqlen` (Python `random`, seeded);
- c4 / c4-new: allenai/c4 en shard 0; per sample a random document of >= seqlen tokens, then a
  random window in it;
- a list of strings: every string tokenized whole (no truncation; `nsamples` does not apply),
  batched, left-padded to the batch's longest with `attention_mask` 0 (Optimum's collate);
- a text file or folder of .txt files: the wikitext2 recipe on their text;
- a `.npy` file or numpy int array `[n, seqlen]` of token ids: used as is.

`<bos>`: when the tokenizer asks for a beginning-of-sequence token (`bos_token_id(tokenizer)`: its
`add_bos_token`, or its encodings start with it: Gemma's do, SmolLM2's do not), every random window
is `<bos>` followed by `seqlen - 1` text tokens, because such models are only meaningful after it.
Pass `bos_token_id=None` to get Optimum's plain windows. Evaluation windows do the same
(`gptq_jax.eval.perplexity(..., bos_token_id=...)`).
"""

from __future__ import annotations

import glob
import os
import random
import socket
from typing import Any, Sequence

import numpy as np

NAMED_DATASETS = ("wikitext2", "c4", "c4-new")
SOTU_DIR = os.path.join(os.path.dirname(__file__), "assets", "sotu")
_SOTU_EVAL_FROM = 2016
# The name of the bundled held-out text (the 2016-2021 addresses) where a text file is asked for:
# scripts/perplexity.py --text, scripts/quantize_llama.py --eval-text (its default).
SOTU_EVAL = "sotu-eval"
_HUB_HOST = "huggingface.co"

Batch = dict[str, np.ndarray]


def sotu_files(split: str = "all") -> list[str]:
  """The bundled State of the Union files: "calib" 1990-2015, "eval" 2016-2021, "all"."""
  files = sorted(glob.glob(os.path.join(SOTU_DIR, "*.txt")))
  year = lambda f: int(os.path.basename(f)[:4])  # noqa: E731
  if split == "calib":
    return [f for f in files if year(f) < _SOTU_EVAL_FROM]
  if split == "eval":
    return [f for f in files if year(f) >= _SOTU_EVAL_FROM]
  if split == "all":
    return files
  raise ValueError(f"sotu split {split!r} is invalid: expected 'calib', 'eval' or 'all'")


def sotu_texts(split: str = "all") -> str:
  """The bundled addresses of a split, sorted by name, joined with blank lines."""
  return _read_texts(sotu_files(split))


def _read_texts(files: Sequence[str]) -> str:
  texts = []
  for path in files:
    with open(path, encoding="utf-8") as f:
      texts.append(f.read().strip())
  return "\n\n".join(texts)


def _read_text_path(path: str) -> str:
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True))
    if not files:
      raise ValueError(f"folder {path!r} has no .txt files")
    return _read_texts(files)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"text file {path!r} does not exist")
  return _read_texts([path])


def check_text(path: str, flag: str, also: str = "") -> None:
  """``path`` names a text ``read_text`` takes (or ``SOTU_EVAL``): one clear error otherwise
  (``also``: another choice the caller accepts, said in the message)."""
  if path != SOTU_EVAL and not os.path.exists(path):
    choices = ["a .txt file", "a folder of .txt files",
               f"{SOTU_EVAL!r} for the bundled 2016-2021 addresses"] + ([also] if also else [])
    raise FileNotFoundError(f"{flag} {path!r} does not exist (pass {', '.join(choices[:-1])}, or "
                            f"{choices[-1]})")


def read_text(path: str | os.PathLike) -> str:
  """A .txt file, every .txt file of a folder (sorted by name, joined with blank lines), or for
  ``"sotu-eval"`` the bundled held-out addresses (2016-2021)."""
  path = os.fspath(path)
  if path == SOTU_EVAL:
    return sotu_texts("eval")
  return _read_text_path(path)


def tokenize_text(text: str, tokenizer: Any) -> np.ndarray:
  """A text as one int32 token array `[n]` (the tokenizer's special tokens included, as Optimum)."""
  if tokenizer is None:
    raise ValueError("a tokenizer is needed to tokenize text (or pass token ids as a .npy array)")
  ids = tokenizer(text, verbose=False)["input_ids"]
  return np.asarray(ids, dtype=np.int32)


def bos_token_id(tokenizer: Any) -> int | None:
  """The id every window should start with, when the tokenizer asks for one (its `add_bos_token`,
  or its encoding of a short text starts with `bos_token_id`); else None."""
  bos = getattr(tokenizer, "bos_token_id", None)
  if not isinstance(bos, int) or isinstance(bos, bool):
    return None
  if getattr(tokenizer, "add_bos_token", None) is True:
    return bos
  try:
    ids = list(tokenizer("a")["input_ids"])
  except Exception:  # noqa: BLE001 (a stand-in tokenizer): no evidence it wants one
    return None
  return bos if ids[:1] == [bos] else None


def _resolve_bos(bos: Any, tokenizer: Any) -> int | None:
  if isinstance(bos, str):
    if bos != "auto":
      raise ValueError(f"bos_token_id={bos!r} is invalid: expected 'auto', None or a token id")
    return bos_token_id(tokenizer) if tokenizer is not None else None
  if bos is not None and (not isinstance(bos, (int, np.integer)) or bos < 0):
    raise ValueError(f"bos_token_id={bos!r} is invalid: expected 'auto', None or a token id >= 0")
  return None if bos is None else int(bos)


def _windows(tokens: np.ndarray, nsamples: int, seqlen: int, rng: random.Random,
             bos: int | None = None) -> list[np.ndarray]:
  """Optimum's random windows: start = randint(0, n - seqlen - 1), `seqlen` tokens; with `bos`,
  `bos` + `seqlen - 1` tokens (a `bos` that starts the text is dropped first)."""
  if bos is not None:
    if tokens.shape[0] and tokens[0] == bos:
      tokens = tokens[1:]
    seqlen -= 1
  n = tokens.shape[0]
  if n < seqlen + 1:
    raise ValueError(f"the text has {n} tokens; random windows of seqlen={seqlen} need at least "
                     f"{seqlen + 1}: pass more text or a smaller seqlen")
  starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
  if bos is None:
    return [tokens[i:i + seqlen] for i in starts]
  return [np.concatenate([np.asarray([bos], np.int32), tokens[i:i + seqlen]]) for i in starts]


def text_calib_batches(text: str, tokenizer: Any, *, nsamples: int = 128, seqlen: int = 2048,
                       seed: int = 0, batch_size: int = 1,
                       bos_token_id: int | str | None = "auto") -> list[Batch]:
  """The wikitext2 recipe on a text string: `nsamples` random `seqlen` windows of its tokens
  (each starting with `<bos>` when the tokenizer asks for it; see the module docstring).

  `text_calib_batches(sotu_texts("calib"), tokenizer, ...)` is the offline default calibration.
  """
  _check_sizes(nsamples=nsamples, seqlen=seqlen, batch_size=batch_size)
  bos = _resolve_bos(bos_token_id, tokenizer)
  samples = _windows(tokenize_text(text, tokenizer), nsamples, seqlen, random.Random(seed), bos)
  return _batch(samples, batch_size, _pad_id(tokenizer))


def _check_sizes(**sizes: Any) -> None:
  for name, value in sizes.items():
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name}={value!r} is invalid: expected a positive int")


class DatasetUnavailable(RuntimeError):
  """A named calibration set cannot be loaded here (no hub, no `datasets`)."""


def _hub_unreachable(name: str, error: BaseException | None) -> RuntimeError:
  why = f" ({type(error).__name__}: {str(error).splitlines()[0][:200]})" if error else ""
  return DatasetUnavailable(
      f"calibration set {name!r} needs the Hugging Face hub (through `datasets`), which is "
      f"unreachable here{why}. Pass instead: a local .txt file or folder of .txt files, a list of "
      f"strings, or a .npy int array [nsamples, seqlen] of token ids; the bundled State of the "
      f"Union text is at {SOTU_DIR!r} (gptq_jax.data.sotu_texts('calib')). If the set is in your "
      f"local datasets cache, set HF_DATASETS_OFFLINE=1.")


def _load_hub_dataset(name: str, *args, **kwargs):
  offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
  if not offline:  # fail fast instead of `datasets`' retries when the hub cannot be resolved
    try:
      socket.create_connection((_HUB_HOST, 443), timeout=5).close()
    except OSError as e:
      raise _hub_unreachable(name, e) from None
  try:
    import datasets  # noqa: PLC0415 (optional dependency)
  except ImportError:
    raise DatasetUnavailable(f"calibration set {name!r} needs the `datasets` package "
                       "(pip install datasets), or pass local text / token arrays") from None
  try:
    return datasets.load_dataset(*args, **kwargs)
  except Exception as e:  # noqa: BLE001 (ConnectionError, FileNotFoundError, DatasetNotFoundError...)
    raise _hub_unreachable(name, e) from None


def _named_samples(name: str, tokenizer: Any, nsamples: int, seqlen: int,
                   rng: random.Random, bos: int | None = None) -> list[np.ndarray]:
  if name == "wikitext2":
    data = _load_hub_dataset(name, "wikitext", "wikitext-2-raw-v1", split="train")
    text = "".join(" \n" if s == "" else s for s in data["text"][:1000])
    return _windows(tokenize_text(text, tokenizer), nsamples, seqlen, rng, bos)
  # c4 and c4-new: identical recipes in Optimum.
  data = _load_hub_dataset(name, "allenai/c4", split="train",
                           data_files={"train": "en/c4-train.00000-of-01024.json.gz"})
  samples = []
  for _ in range(nsamples):
    while True:
      doc = tokenize_text(data[rng.randint(0, len(data) - 1)]["text"], tokenizer)
      if doc.shape[0] > seqlen:
        break
    samples += _windows(doc, 1, seqlen, rng, bos)
  return samples


def _pad_id(tokenizer: Any) -> int:
  for attr in ("pad_token_id", "eos_token_id"):
    value = getattr(tokenizer, attr, None)
    if isinstance(value, int):
      return value
  return 0


def _batch(samples: list[np.ndarray], batch_size: int, pad_id: int) -> list[Batch]:
  """Groups 1-D samples in batches, left-padded to each batch's longest (mask 0 on padding)."""
  batches = []
  for b in range(0, len(samples), batch_size):
    group = samples[b:b + batch_size]
    width = max(s.shape[0] for s in group)
    ids = np.full((len(group), width), pad_id, np.int32)
    mask = np.zeros((len(group), width), np.int32)
    for r, s in enumerate(group):
      ids[r, width - s.shape[0]:] = s
      mask[r, width - s.shape[0]:] = 1
    batches.append({"input_ids": ids, "attention_mask": mask})
  return batches


def _token_array(array: np.ndarray, where: str) -> np.ndarray:
  if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
    raise ValueError(f"{where}: token ids must be an int array [nsamples, seqlen], got "
                     f"{array.dtype} {array.shape}")
  if array.size and array.min() < 0:
    raise ValueError(f"{where}: token ids must be >= 0")
  return array.astype(np.int32)


def get_calib_batches(dataset: Any, tokenizer: Any = None, *, nsamples: int = 128,
                      seqlen: int = 2048, seed: int = 0, batch_size: int = 1,
                      bos_token_id: int | str | None = "auto") -> list[Batch]:
  """Calibration batches `[{"input_ids": int32 [b, seqlen], "attention_mask": int32 [b, seqlen]}]`.

  dataset: "wikitext2" | "c4" | "c4-new" | a .txt file or folder | a list of strings | a .npy file
  or numpy int array `[n, seqlen]` (used as is). Deterministic for a given `seed`. Random windows
  start with `<bos>` when the tokenizer asks for it ("auto"; None: never; or an id); strings are
  tokenized whole, with the tokenizer's own special tokens.
  """
  _check_sizes(nsamples=nsamples, seqlen=seqlen, batch_size=batch_size)
  rng = random.Random(seed)
  bos = _resolve_bos(bos_token_id, tokenizer)
  pad_id = _pad_id(tokenizer)
  if isinstance(dataset, np.ndarray):
    samples = list(_token_array(dataset, "dataset array"))
  elif isinstance(dataset, (list, tuple)):
    if not dataset or not all(isinstance(s, str) for s in dataset):
      raise ValueError("a dataset list must be a non-empty list of strings")
    samples = [tokenize_text(s, tokenizer) for s in dataset]
    if any(s.shape[0] == 0 for s in samples):
      raise ValueError("a dataset string tokenized to no tokens")
  elif isinstance(dataset, (str, os.PathLike)):
    spec = os.fspath(dataset)
    if spec in NAMED_DATASETS:
      samples = _named_samples(spec, tokenizer, nsamples, seqlen, rng, bos)
    elif spec.endswith(".npy"):
      if not os.path.isfile(spec):
        raise FileNotFoundError(f"token array {spec!r} does not exist")
      samples = list(_token_array(np.load(spec, allow_pickle=False), spec))
    elif os.path.exists(spec):
      samples = _windows(tokenize_text(read_text(spec), tokenizer), nsamples, seqlen, rng, bos)
    else:
      raise ValueError(f"dataset {spec!r} is neither one of {NAMED_DATASETS} nor an existing "
                       ".txt file, folder or .npy file")
  else:
    raise ValueError(f"dataset of type {type(dataset).__name__} is not supported: pass a name, "
                     "a path, a list of strings or a numpy int array")
  return _batch(samples, batch_size, pad_id)

"""One compiled program and what the compiler says about it.

``measure(name, fn, args)`` traces, lowers and compiles a jitted function for the devices its
``ShapeDtypeStruct`` arguments are sharded over (a TPU slice from libtpu's compile-only client, or
the attached devices), and keeps the compiler's own figures, per chip: ``memory_analysis()``
(argument, output, aliased and temporary bytes, generated code) and ``cost_analysis()`` (FLOPs and
bytes accessed of one call), and how many Mosaic kernel calls it holds. XLA's cost analysis counts the body of a loop once (a ``scan`` or
``fori_loop`` of 100 matmuls costs as one): ``loops`` says how many while-loops the compiled
program holds, so a time built on those figures is known to be a lower bound there.

Programs that lower to the same module (layers of the same shapes, another block of the same
type) are compiled once per process (``_memo``, keyed by the lowered text and the devices). A
figures file (``use_figures_file``; ``scripts/plan.py --figures``) keeps them across processes:
a program is looked up by the SHA-256 of its lowered module, the devices' kind and count, and the
jax and libtpu versions, so a changed program, slice or compiler is compiled again, never served
stale figures. The key does not depend on where the code lives: the module is lowered without
source locations, and the source file names inside a Mosaic kernel's serialized body are cut to
their base names. ``strict=True`` reads the file and compiles nothing: a program it does not hold
raises ``FiguresMissing`` (one line: the program, and the versions the file was recorded with).
``GPTQ_JAX_PLAN_LOG=1`` prints each compilation and its seconds to stderr.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np

_memo: dict[str, dict] = {}
_FIELDS = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "code_bytes", "flops",
           "bytes_accessed", "loops", "kernel_calls")
_figures: dict = {"path": None, "table": {}, "strict": False, "used": set()}
META = "_recorded_with"  # the figures file's entry naming the jax / libtpu versions it holds


class FiguresMissing(ValueError):
  """A strict figures file (``use_figures_file(strict=True)``) does not hold a program."""


def use_figures_file(path: str | None, *, strict: bool = False) -> None:
  """Read (and write back) compiler figures from ``path`` (None: none kept across processes).
  ``strict``: read only, compile nothing (a program not in the file raises ``FiguresMissing``).
  Forgets the figures of programs compiled so far in this process."""
  _memo.clear()
  _figures.update(path=path, table={}, strict=strict, used=set())
  if path and os.path.isfile(path):
    with open(path) as f:
      _figures["table"] = json.load(f)
  elif strict:
    raise FiguresMissing(f"the compiler figures file {path} does not exist")


def figures_used() -> dict:
  """The figures of every program looked up or compiled since ``use_figures_file``, with the
  versions entry: what a recording keeps (entries of programs no longer made are left out)."""
  table = _figures["table"]
  return {META: _versions(), **{k: table[k] for k in sorted(_figures["used"]) if k in table}}


def _versions() -> str:
  try:
    import libtpu  # noqa: PLC0415

    tpu = getattr(libtpu, "__version__", "")
  except ImportError:
    tpu = ""
  return f"jax {jax.__version__} libtpu {tpu}"


def _save_figures() -> None:
  path = _figures["path"]
  if path and not _figures["strict"]:
    _figures["table"][META] = _versions()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(_figures["table"], f, indent=0, sort_keys=True)
    os.replace(tmp, path)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Program:
  """A compiled program of the run, its compiler figures per chip, and how often it runs.

  ``beside``: bytes the run keeps alive on the busiest chip beside the program's own arguments,
  outputs and temporaries (the calibration activations, the block on its home device, ...: the
  plan's accounting, listed in ``beside_parts``).
  """

  name: str
  phase: str
  calls: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  flops: float
  bytes_accessed: float
  loops: int
  kernel_calls: int = 0  # Mosaic (Pallas) kernel calls in the compiled program
  beside_parts: tuple[tuple[str, int], ...] = ()

  @property
  def hbm_bytes(self) -> int:
    """The program's own footprint on a chip: arguments + outputs - donated + temporaries +
    its code (memory_analysis)."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)

  @property
  def beside(self) -> int:
    return sum(b for _, b in self.beside_parts)

  @property
  def peak_bytes(self) -> int:
    return self.hbm_bytes + self.beside

  def seconds(self, chip) -> float:
    """All calls at the chip's roofline."""
    return self.calls * chip.roofline_seconds(self.flops, self.bytes_accessed)

  def with_beside(self, parts: Sequence[tuple[str, int]], calls: int | None = None) -> "Program":
    return dataclasses.replace(self, beside_parts=tuple((k, int(v)) for k, v in parts if v),
                               calls=self.calls if calls is None else calls)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["beside_parts"] = dict(self.beside_parts)
    d.update(hbm_bytes=self.hbm_bytes, peak_bytes=self.peak_bytes)
    return d


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per module
    cost = cost[0] if cost else {}
  return cost or {}


def _devices_of(args: Sequence[Any]) -> str:
  for leaf in jax.tree.leaves(args):
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None:
      devices = sorted(sharding.device_set, key=lambda d: d.id)
      return f"{devices[0].platform} {devices[0].device_kind} x{len(devices)} " + ",".join(
          str(d.id) for d in devices)
  return "default"


def _lower(fn, args: Sequence[Any]):
  """``fn`` lowered for ``args`` with source file names cut to their base names (they reach the
  module only inside a Mosaic kernel's serialized body; a jax config in the trace context, so
  programs lowered for running are not affected)."""
  from jax._src import config as jax_config  # noqa: PLC0415 (the flag has no public setter)

  with jax_config.hlo_source_file_canonicalization_regex(r".*/"):
    return fn.trace(*args).lower()


def _missing(name: str) -> FiguresMissing:
  recorded = _figures["table"].get(META, "unknown versions")
  now = _versions()
  why = (f"it was recorded with {recorded} and this is {now}" if recorded != now else
         "the program, the slice or a library that shapes it changed since")
  return FiguresMissing(f"the compiler figures file {_figures['path']} has no entry for "
                        f"'{name}': {why}")


def compile_figures(fn, args: Sequence[Any], name: str = "a program") -> dict:
  """The compiler's figures for ``fn(*args)`` (``fn`` jitted; static arguments given in place)."""
  t0 = time.perf_counter()
  lowered = _lower(fn, args)
  key = hashlib.sha256((lowered.as_text() + _devices_of(args) + _versions()).encode()).hexdigest()
  _figures["used"].add(key)
  if key not in _memo and key in _figures["table"]:
    _memo[key] = dict(_figures["table"][key], hlo="")
  if key not in _memo and _figures["strict"]:
    raise _missing(name)
  if key not in _memo:
    t1 = time.perf_counter()
    compiled = lowered.compile()
    if os.environ.get("GPTQ_JAX_PLAN_LOG") == "1":
      print(f"plan: compiled '{name}' in {time.perf_counter() - t1:.1f} s (lowered in "
            f"{t1 - t0:.1f} s)", file=sys.stderr, flush=True)
    mem, cost = compiled.memory_analysis(), _cost(compiled)
    text = compiled.as_text() or ""
    _memo[key] = dict(
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
        flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        loops=text.count(" while("), kernel_calls=text.count('"tpu_custom_call"'), hlo=text)
    if _figures["path"]:
      _figures["table"][key] = {k: _memo[key][k] for k in _FIELDS}
      _save_figures()
  return _memo[key]


def measure(name: str, phase: str, fn, args: Sequence[Any], *, calls: int = 1) -> Program:
  fig = {k: v for k, v in compile_figures(fn, args, name).items() if k != "hlo"}
  return Program(name=name, phase=phase, calls=calls, **fig)


def nbytes(tree: Any) -> int:
  """Bytes of every array (or ShapeDtypeStruct) in ``tree``, counted on one device: a leaf sharded
  over devices counts its shard; a leaf found twice (one input kept for two linears) once."""
  total, seen = 0, set()
  for leaf in jax.tree.leaves(tree):
    if id(leaf) in seen:
      continue
    seen.add(id(leaf))
    shape = tuple(leaf.shape)
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None and hasattr(sharding, "shard_shape"):
      shape = tuple(sharding.shard_shape(shape))
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total

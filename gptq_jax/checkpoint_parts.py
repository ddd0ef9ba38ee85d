"""A checkpoint written piece by piece: large subtrees stored as their own orbax steps.

``checkpoint.save`` writes the whole parameter tree in one orbax save, which holds the tree (and
orbax's serialization buffers, about as much again) in host memory at once. For a model that
never fits in memory whole (the streamed CLI), ``PartsWriter`` writes the same checkpoint folder
a subtree at a time:

    <path>/orbax/0/           params: what is left (the final norm, a packed lm_head, ...);
                              meta: the configs, and ``parts``: {top-level key: [folder, step,
                              SHA-256 of that step's checksum table]}
    <path>/blocks/<i>/        the decoder blocks, one orbax step each: linked (hard links, else
                              copies) from the resume state's per-block saves, never re-read
    <path>/nonlayer/<k>/      other large subtrees (the float embedding, lm_head), one each, or
                              one per piece (``add_pieces``: consecutive row or column slices
                              of one array, so the array is never in memory whole)

``checkpoint.read`` puts the parts back in place (``checkpoint.read_parts``): the reloaded tree is
the tree a single save would have written. Every step has its own checksum
table (``integrity.py``) and the top step records each part's table's digest, so a part that is
missing, damaged or swapped for another run's is named on load.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Iterable

import jax

from gptq_jax.checkpoint import PARTS, table_digest, write_tree


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices(name)


def _link_tree(src: str, dst: str) -> None:
  """``dst`` as a copy of the folder ``src`` made of hard links (a copy where links fail)."""
  def link(a, b):
    try:
      os.link(a, b)
    except OSError:
      shutil.copy2(a, b)

  shutil.copytree(src, dst, copy_function=link)


class PartsWriter:
  """Writes a checkpoint folder at ``path`` a part at a time; ``finish`` makes it appear.

  Under ``jax.distributed`` every process calls every method (the orbax saves are collective);
  process 0 alone links, writes the tokenizer and renames.
  """

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    if os.path.exists(self.path):
      raise FileExistsError(f"{self.path!r} already exists: choose another output folder "
                            "(nothing was overwritten)")
    self.tmp = self.path + ".saving"
    self.primary = jax.process_index() == 0
    if self.primary:
      if os.path.exists(self.tmp):
        shutil.rmtree(self.tmp)  # a save that was killed midway: never a finished checkpoint
      os.makedirs(self.tmp)
    _sync("gptq_jax parts: start")
    self.parts: dict[str, list] = {}

  def _next_step(self) -> int:
    """The next free step under ``nonlayer/`` (a part saved in pieces uses one per piece)."""
    return sum(len(v[3]["pieces"]) if len(v) > 3 else 1 for v in self.parts.values()
               if v[0] == "nonlayer")

  def add(self, key: str, tree: Any) -> None:
    """Save ``tree`` as the top-level subtree ``key`` (its own step under ``nonlayer/``)."""
    step = self._next_step()
    write_tree(os.path.join(self.tmp, "nonlayer"), step, {key: tree}, {"key": key})
    self.parts[key] = ["nonlayer", step]

  def add_pieces(self, key: str, leaf: str, axis: int, pieces: Iterable[Any]) -> None:
    """Save the array ``{key: {leaf: ...}}`` a piece at a time: each piece (consecutive slices
    along ``axis``, e.g. an embedding's rows) is its own step, so the whole array is never in
    memory; ``read_parts`` puts them back together."""
    from gptq_jax.checkpoint import write_tree  # noqa: PLC0415

    steps = []
    for piece in pieces:
      step = self._next_step()
      write_tree(os.path.join(self.tmp, "nonlayer"), step, {key: {leaf: piece}},
                 {"key": key, "piece": len(steps)})
      steps.append([step, None, int(piece.shape[axis])])
      self.parts[key] = ["nonlayer", steps[0][0], None,
                         {"leaf": leaf, "axis": axis, "pieces": steps}]

  def link_blocks(self, blocks_dir: str, keys: dict[str, int]) -> None:
    """Take finished steps of another orbax manager (``{top-level key: step}``), e.g. the resume
    state's per-block saves, as parts: linked, not read."""
    for key, step in keys.items():
      if self.primary:
        _link_tree(os.path.join(blocks_dir, str(step)), os.path.join(self.tmp, "blocks", str(step)))
      self.parts[key] = ["blocks", step, None]
    _sync("gptq_jax parts: linked")

  def finish(self, rest: Any, meta: dict, tokenizer: Any = None) -> str:
    """Write ``rest`` (the tree without the parts) and ``meta`` as the top step; move into place."""
    parts = {}
    for key, (folder, step, *more) in self.parts.items():
      step_dir = os.path.join(self.tmp, folder, str(step))
      parts[key] = [folder, step, table_digest(step_dir)]
      if len(more) > 1:  # a part saved in pieces: every piece's table digest too
        pieces = [[s, table_digest(os.path.join(self.tmp, folder, str(s))), n]
                  for s, _, n in more[1]["pieces"]]
        parts[key].append({**more[1], "pieces": pieces})
    write_tree(os.path.join(self.tmp, "orbax"), 0, rest, {**meta, PARTS: parts})
    if self.primary:
      if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(self.tmp, "tokenizer"))
      os.rename(self.tmp, self.path)
    _sync("gptq_jax parts: done")
    return self.path


"""Rows sorted by expert, in tiles: the layout of the grouped matmul and of per-expert Hessians.

A mixture-of-experts layer sends each token to a few experts. Sorted by expert, the rows of the
routed input form contiguous groups (``group_sizes[e]`` rows for expert ``e``), the layout of
MaxText's MoE and of ``jax.lax.ragged_dot``. Where a grouped matmul is not native (XLA:CPU expands
``ragged_dot`` into one dense product per group: E times the work), the rows are copied into
tiles of ``tile`` rows, each group starting on a new tile (zero rows pad a group's last tile), so
every tile belongs to one expert and a ``lax.scan`` over tiles does one ``[tile, in] x [in, out]``
product per step with that expert's weight: the work is that of the real rows plus at most one
tile per expert.

``expert_gram`` uses the same tiles for the per-expert Hessian statistics: ``X_e^T X_e`` summed
over exactly the rows routed to expert ``e`` (padding tokens masked out), and their count.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
MIN_TILE, MAX_TILE = 8, 64  # 64: the fastest of 32..256 for 16k rows, 32 experts, 1024 x 512 (CPU)


class TileLayout(NamedTuple):
  dest: jax.Array  # [rows] int32: the padded row of each sorted row
  tile_group: jax.Array  # [tiles] int32: the expert of each tile
  tiles: int  # static: number of tiles (an upper bound: trailing tiles are all padding)
  tile: int  # static: rows per tile


def choose_tile(rows: int, num_groups: int) -> int:
  """Rows per tile: about a quarter of a group's expected size, a power of two in [8, 64] (the
  padding is at most one tile per group; smaller tiles cost more scan steps)."""
  target = max(1, rows // max(1, 4 * num_groups))
  tile = MIN_TILE
  while tile * 2 <= min(target, MAX_TILE):
    tile *= 2
  return tile


def tile_layout(group_sizes: jax.Array, rows: int, tile: int | None = None) -> TileLayout:
  """The tiled layout of ``rows`` sorted rows in groups of ``group_sizes`` ``[E]`` (summing to
  ``rows``)."""
  num_groups = group_sizes.shape[0]
  tile = tile or choose_tile(rows, num_groups)
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  padded = (sizes + tile - 1) // tile * tile
  padded_ends = jnp.cumsum(padded)
  tiles = -(-rows // tile) + num_groups
  row = jnp.arange(rows, dtype=jnp.int32)
  group = jnp.minimum(jnp.searchsorted(ends, row, side="right"), num_groups - 1)
  dest = (padded_ends - padded)[group] + row - (ends - sizes)[group]
  starts = jnp.arange(tiles, dtype=jnp.int32) * tile
  tile_group = jnp.minimum(jnp.searchsorted(padded_ends, starts, side="right"), num_groups - 1)
  return TileLayout(dest.astype(jnp.int32), tile_group.astype(jnp.int32), tiles, tile)


def to_tiles(x: jax.Array, layout: TileLayout) -> jax.Array:
  """x: [rows, d] sorted -> [tiles, tile, d], zero rows where no sorted row lands."""
  padded = jnp.zeros((layout.tiles * layout.tile, x.shape[-1]), x.dtype).at[layout.dest].set(x)
  return padded.reshape(layout.tiles, layout.tile, x.shape[-1])


def from_tiles(y: jax.Array, layout: TileLayout) -> jax.Array:
  """y: [tiles, tile, d] -> [rows, d] in the sorted order."""
  return y.reshape(layout.tiles * layout.tile, y.shape[-1])[layout.dest]


@functools.partial(jax.jit, static_argnames=("num_groups",))
def expert_gram(x: jax.Array, group_sizes: jax.Array, row_mask: jax.Array | None = None,
                *, num_groups: int) -> tuple[jax.Array, jax.Array]:
  """Per-expert ``X^T X`` of sorted rows -> (``[E, d, d]`` float32, counts ``[E]`` float32).

  x: [rows, d] sorted by expert; group_sizes: [E]; row_mask: [rows] (1 = a real token's row, 0 =
  padding), None = all real. Rows of expert e are ``x[start_e : start_e + group_sizes[e]]``.
  """
  del num_groups  # = group_sizes.shape[0]; keyword for callers' readability
  rows, d = x.shape
  x = x.astype(jnp.float32)
  mask = jnp.ones((rows,), jnp.float32) if row_mask is None else row_mask.astype(jnp.float32)
  layout = tile_layout(group_sizes, rows)
  tiles = to_tiles(x * mask[:, None], layout)  # masked rows contribute nothing
  E = group_sizes.shape[0]

  def step(xtx, inp):
    xt, g = inp
    update = jnp.matmul(xt.T, xt, precision=HIGHEST)
    return xtx.at[g].add(update), None

  init = jnp.zeros_like(x, shape=(E, d, d))  # like x: under shard_map it varies over the data axis
  xtx, _ = jax.lax.scan(step, init, (tiles, layout.tile_group))
  group_of_row = jnp.minimum(jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(rows),
                                              side="right"), E - 1)
  counts = jnp.zeros((E,), jnp.float32).at[group_of_row].add(mask)
  return xtx, counts

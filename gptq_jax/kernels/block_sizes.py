"""Block sizes for the Pallas kernels: a small table per platform (and TPU generation), fitted to
each shape.

``bm`` rows of activations, ``bn`` output columns, ``bk`` K-rows per grid step (TPU; on GPU one
program walks all of K), ``bkc`` K-rows per inner chunk (one unpack + one dot). The table gives the
preferred sizes per regime (decode: few rows, the weight bytes dominate, so big weight tiles; prefill:
MXU / tensor-core sized tiles); ``choose`` shrinks them to the largest sizes the shape and the
platform's rules allow, or returns the reason there are none (``can_use_kernel`` reports it).

TPU sizes are kept per generation (``TPU_TABLE``: v4, v5e, v5p, v6e), chosen by compiling
candidates with the TPU compiler for each generation (``benchmarks/tune_block_sizes.py`` writes the
table and says how it chooses). The generation is the local TPU's (``tpu_generation``), or the
one a caller compiling for another slice names with ``for_generation`` (``scripts/plan.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses

from gptq_jax.core.packing import run_shape
from gptq_jax.kernels.layout import effective_group_size, groups_per_chunk


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  bm: int
  bn: int
  bk: int
  bkc: int


# (max rows M, preferred sizes); bm=0 means "all rows, padded to the sublane tile".
# --- TPU_TABLE: written by benchmarks/tune_block_sizes.py (do not edit by hand) ---
TPU_TABLE = {
    "v4": ((64, BlockSizes(bm=0, bn=2048, bk=2048, bkc=512)),
           (None, BlockSizes(bm=256, bn=1024, bk=4096, bkc=512))),
    "v5e": ((64, BlockSizes(bm=0, bn=2048, bk=2048, bkc=512)),
            (None, BlockSizes(bm=256, bn=2048, bk=2048, bkc=512))),
    "v5p": ((64, BlockSizes(bm=0, bn=2048, bk=2048, bkc=512)),
            (None, BlockSizes(bm=256, bn=2048, bk=2048, bkc=512))),
    "v6e": ((64, BlockSizes(bm=0, bn=2048, bk=4096, bkc=512)),
            (None, BlockSizes(bm=256, bn=2048, bk=4096, bkc=512))),
}
# Bytes of VMEM a grid step may use by our own estimate (``_tpu_vmem``), per generation: the
# estimate of the largest tiles the compiler accepted (the compiler's scoped VMEM limit decides;
# shapes the table does not fit are shrunk until they are under it).
VMEM_BUDGET = {"v4": 31850496, "v5e": 37748736, "v5p": 37748736, "v6e": 56623104}
# --- end of TPU_TABLE ---
TABLE = {
    "gpu": ((16, BlockSizes(bm=16, bn=64, bk=0, bkc=128)),
            (64, BlockSizes(bm=64, bn=64, bk=0, bkc=64)),
            (None, BlockSizes(bm=128, bn=128, bk=0, bkc=32))),
}
DEFAULT_GENERATION = "v5e"  # when no TPU is attached and none is named (lowering on CPU)
# jax's device_kind of each generation's devices
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p",
                "TPU v5p": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e"}
_named: list[str] = []  # the generation named by for_generation (innermost last)


def generation_of(device_kind: str) -> str | None:
  """"v4" / "v5e" / "v5p" / "v6e" for a jax ``device_kind``, None for anything else."""
  return DEVICE_KINDS.get(device_kind)


def tpu_generation() -> str:
  """The TPU generation block sizes are chosen for: the one named by ``for_generation``, else the
  attached TPU's, else ``DEFAULT_GENERATION``."""
  if _named:
    return _named[-1]
  import jax  # noqa: PLC0415 (kept out of the module's import: the table is plain data)

  device = jax.devices()[0]
  return (generation_of(device.device_kind) if device.platform == "tpu" else None) or \
      DEFAULT_GENERATION


@contextlib.contextmanager
def for_generation(generation: str):
  """Choose TPU block sizes for ``generation`` while tracing inside (compiling for a slice that
  is not attached)."""
  if generation not in TPU_TABLE:
    raise ValueError(f"generation={generation!r}: block sizes are kept for {tuple(TPU_TABLE)}")
  _named.append(generation)
  try:
    yield
  finally:
    _named.pop()


def _round_up(a: int, b: int) -> int:
  return -(-a // b) * b


def _pow2(a: int) -> bool:
  return a > 0 and a & (a - 1) == 0


def preferred(platform: str, m: int, generation: str | None = None) -> BlockSizes:
  rows = TPU_TABLE[generation or tpu_generation()] if platform == "tpu" else TABLE[platform]
  for max_m, sizes in rows:
    if max_m is None or m <= max_m:
      return sizes
  raise AssertionError("the last table row has max_m=None")


def _largest(cands: list[int], limit: int) -> int | None:
  below = [c for c in cands if c <= limit]
  return max(below) if below else (min(cands) if cands else None)


def _tpu_vmem(b: BlockSizes, bits: int, gc: int, x_bytes: int) -> int:
  nc = b.bk // b.bkc
  x = nc * b.bm * b.bkc * x_bytes
  w = b.bk * bits // 8 * b.bn
  sz = 2 * nc * max(gc, 8) * 8 * b.bn * 4  # scales + zeros, (1, bn) rows padded to (8, bn) tiles
  temps = b.bkc * b.bn * (4 + 4 + 4 + x_bytes) + 2 * b.bm * b.bn * 4
  return 2 * (x + w + sz) + temps


def choose_tpu(m: int, k: int, n: int, bits: int, group_size: int,
               x_bytes: int, generation: str | None = None) -> BlockSizes | str:
  """Mosaic block sizes, or why there are none. Rules: block last dims multiples of (8, 128) or
  full; each chunk's word rows (bkc / nvals) a multiple of 8 (aligned slices and merges); a chunk
  holding several groups needs each group's word rows a multiple of 8 too."""
  if bits not in (2, 4, 8):
    return (f"{bits}-bit words straddle rows (32 values in 3 words), which the TPU kernel does not "
            "unpack")
  nvals, _ = run_shape(bits)
  gs = effective_group_size(group_size, k)
  generation = generation or tpu_generation()
  budget = VMEM_BUDGET[generation]
  pref = preferred("tpu", m, generation)
  sub = 8 if x_bytes == 4 else 16
  bm = _round_up(m, sub) if pref.bm == 0 else min(pref.bm, _round_up(m, sub))
  if group_size != -1 and (gs % nvals or (gs // nvals) % 8):
    return (f"group_size={group_size} at {bits} bits gives {gs / nvals:g} word rows per group; the "
            f"TPU kernel needs a multiple of 8 (group_size % {8 * nvals} == 0) to broadcast scales "
            "on whole sublane tiles")
  chunks = [c for c in range(8 * nvals, k + 1, 8 * nvals)
            if k % c == 0 and groups_per_chunk(c, gs) is not None]
  if not chunks:
    return (f"in_features={k} has no K-chunk that is a multiple of {8 * nvals} rows, divides it and "
            f"nests with group_size={group_size}")
  bns = [c for c in range(128, n + 1, 128) if n % c == 0] or [n]
  bn = _largest(bns, pref.bn)
  bkc = _largest(chunks, pref.bkc)
  tiles = [t for t in range(bkc, k + 1, bkc)
           if k % t == 0 and (bkc % gs == 0 or gs % t == 0)]
  bk = _largest(tiles, pref.bk)
  gc = groups_per_chunk(bkc, gs)
  sizes = BlockSizes(bm=bm, bn=bn, bk=bk, bkc=bkc)
  while _tpu_vmem(sizes, bits, gc, x_bytes) > budget:
    smaller_bk = [t for t in tiles if t < sizes.bk]
    smaller_bn = [c for c in bns if c < sizes.bn]
    if smaller_bk:
      sizes = dataclasses.replace(sizes, bk=max(smaller_bk))
    elif smaller_bn:
      sizes = dataclasses.replace(sizes, bn=max(smaller_bn))
    else:
      return (f"no tiling of a {k}x{n} weight with {sizes.bm} activation rows fits in "
              f"{budget >> 20} MiB of VMEM ({generation})")
  return sizes


def choose_gpu(m: int, k: int, n: int, bits: int, group_size: int) -> BlockSizes | str:
  """Triton block sizes, or why there are none. Rules: every tensor a power of two, every dot at
  least 16x16x16."""
  if bits not in (2, 4, 8):
    return (f"{bits}-bit words straddle rows (32 values in 3 words), which the GPU kernel does not "
            "unpack")
  nvals, _ = run_shape(bits)
  gs = effective_group_size(group_size, k)
  pref = preferred("gpu", m)
  chunks = [c for c in (16, 32, 64, 128, 256, 512) if c >= nvals and k % c == 0
            and groups_per_chunk(c, gs) is not None and _pow2(groups_per_chunk(c, gs))]
  if not chunks:
    return (f"in_features={k} has no power-of-two K-chunk >= 16 that divides it and nests with "
            f"group_size={group_size} (Triton tensors are powers of two)")
  bns = [c for c in (16, 32, 64, 128, 256) if n % c == 0]
  if not bns:
    return f"out_features={n} is not a multiple of 16 (Triton tensors are powers of two >= 16)"
  bm = min(pref.bm, max(16, 1 << (max(m, 1) - 1).bit_length()))
  return BlockSizes(bm=bm, bn=_largest(bns, pref.bn), bk=k, bkc=_largest(chunks, pref.bkc))


def choose(platform: str, m: int, k: int, n: int, bits: int, group_size: int,
           x_bytes: int) -> BlockSizes | str:
  if platform == "tpu":
    return choose_tpu(m, k, n, bits, group_size, x_bytes)
  if platform == "gpu":
    return choose_gpu(m, k, n, bits, group_size)
  raise ValueError(f"platform={platform!r}: the Pallas kernels exist for 'tpu' and 'gpu'")

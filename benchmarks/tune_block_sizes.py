"""Choose the TPU kernel's block sizes per generation by compiling candidates, and write the table.

  .venv-tpu/bin/python benchmarks/tune_block_sizes.py [--write] [--generations v4 v5e v5p v6e]

For each TPU generation (v4, v5e, v5p, v6e: libtpu's compile-only client, no TPU needed) and each
regime of ``gptq_jax/kernels/block_sizes.py`` (decode: at most 64 rows; prefill), the candidates
(``bn`` output columns, ``bk`` K-rows per grid step, ``bkc`` K-rows per unpack-and-dot chunk) are
compiled through ``quantized_matmul`` on representative weights (4- and 8-bit, groups of 128,
bfloat16 activations; 4096 x 14336 and 14336 x 4096, the MLP of an 8B model), largest tile first.

Criterion: the largest weight tile (``bk * bn``, then ``bkc``) that the TPU compiler (Mosaic)
compiles for every representative shape. The compiler's scoped VMEM limit is what rejects a tile
too large; nothing of ours is consulted (our VMEM estimate is switched off while tuning). Why the
largest: the compiler's cost figures cannot rank tilings (the FLOPs are the same and a Mosaic call
reports the bytes the kernel declares), and a larger tile means fewer grid steps (each has a fixed
overhead) and longer DMAs; decoding reads every weight once, so its time is the weight bytes over
the bandwidth plus the steps' overhead. A measured ranking needs a TPU; this is the best a compiler
alone can say. ``VMEM_BUDGET`` becomes our estimate of the chosen tiles, so shapes the table does
not fit are shrunk until they are no larger than what the compiler accepted.

Without ``--write`` the table is printed; with it, the marked section of block_sizes.py is
rewritten.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gptq_jax.kernels import PreparedWeight, block_sizes, quantized_matmul  # noqa: E402
from gptq_jax.kernels.block_sizes import BlockSizes  # noqa: E402
from gptq_jax.kernels.layout import groups_per_chunk  # noqa: E402
from gptq_jax.plan import slices  # noqa: E402

S = jax.ShapeDtypeStruct
SHAPES = ((4096, 14336), (14336, 4096))
BITS = (4, 8)  # 8-bit words hold twice the bytes of a 4-bit tile (2-bit: half)
REGIMES = ((64, 1), (None, 512))  # (the table's max rows, the rows compiled)
CALL = 'custom_call_target="tpu_custom_call"'


def candidates(decode: bool):
  bm = 0 if decode else 256
  sizes = [BlockSizes(bm=bm, bn=bn, bk=bk, bkc=bkc)
           for bn, bk, bkc in itertools.product((2048, 1024, 512, 256), (4096, 2048, 1024, 512),
                                                (512, 256)) if bk % bkc == 0]
  return sorted(sizes, key=lambda b: (b.bk * b.bn, b.bkc), reverse=True)


def compiles(gen: str, device, sizes: BlockSizes, m: int) -> str | None:
  """None when every representative shape compiles to the Mosaic kernel with ``sizes`` as the
  preferred tile (the shape's own divisors clamp it, as for any model); else why not (the
  compiler's first line)."""
  sh = SingleDeviceSharding(device)
  jax.clear_caches()  # the jitted matmul's trace holds the previous candidate's block sizes
  saved = block_sizes.TPU_TABLE[gen], block_sizes.VMEM_BUDGET[gen]
  block_sizes.TPU_TABLE[gen] = ((None, sizes),)
  block_sizes.VMEM_BUDGET[gen] = 1 << 40  # the compiler decides
  try:
    with block_sizes.for_generation(gen):
      for (k, n), bits in itertools.product(SHAPES, BITS):
        w = PreparedWeight(qweight=S((k * bits // 32, n), jnp.int32, sharding=sh),
                           scales=S((k // 128, n), jnp.bfloat16, sharding=sh),
                           zeros=S((k // 128, n), jnp.bfloat16, sharding=sh), perm=None,
                           bits=bits, group_size=128)
        x = S((m, k), jnp.bfloat16, sharding=sh)
        f = jax.jit(lambda x, w: quantized_matmul(x, w, backend="pallas"))
        try:
          text = f.trace(x, w).lower().compile().as_text()
        except Exception as e:  # noqa: BLE001 (Mosaic's refusal: VMEM exceeded, ...)
          return f"{k}x{n} {bits}-bit: " + _first_line(e)
        if CALL not in text:
          return f"{k}x{n} {bits}-bit: no Mosaic call (the XLA path)"
    return None
  finally:
    block_sizes.TPU_TABLE[gen], block_sizes.VMEM_BUDGET[gen] = saved


def _first_line(e: Exception) -> str:
  lines = [ln for ln in str(e).splitlines() if ln.strip()]
  return (lines[0] if lines else type(e).__name__)[:300]


def tune(gen: str) -> tuple[tuple, int]:
  topo = f"{gen}:2x2" if gen in ("v5e", "v6e") else f"{gen}:2x2x1"
  device = slices.compile_only(topo).devices[0]
  rows, budget = [], 0
  for max_m, m in REGIMES:
    for sizes in candidates(max_m is not None):
      t0 = time.perf_counter()
      why = compiles(gen, device, sizes, m)
      print(f"{gen} m={m} {sizes}: {'compiles' if why is None else 'refused: ' + why} "
            f"({time.perf_counter() - t0:.1f} s)", flush=True)
      if why is None:
        rows.append((max_m, sizes))
        bm = sizes.bm or 16
        gc = groups_per_chunk(sizes.bkc, 128)
        budget = max(budget, block_sizes._tpu_vmem(BlockSizes(bm=bm, bn=sizes.bn, bk=sizes.bk,
                                                              bkc=sizes.bkc), max(BITS), gc, 2))
        break
    else:
      raise SystemExit(f"{gen}: no candidate compiles for m={m}")
  return tuple(rows), budget


def render(table: dict, budgets: dict) -> str:
  lines = ["TPU_TABLE = {"]
  for gen, rows in table.items():
    pad = " " * (len(gen) + 9)
    body = f",\n{pad}".join(f"({m}, {s!r})" for m, s in rows)
    lines.append(f'    "{gen}": ({body}),')
  lines.append("}")
  lines.append("# Bytes of VMEM a grid step may use by our own estimate (``_tpu_vmem``), per "
               "generation: the")
  lines.append("# estimate of the largest tiles the compiler accepted (the compiler's scoped VMEM "
               "limit decides;")
  lines.append("# shapes the table does not fit are shrunk until they are under it).")
  lines.append("VMEM_BUDGET = {" + ", ".join(f'"{g}": {b}' for g, b in budgets.items()) + "}")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--generations", nargs="+", default=list(block_sizes.TPU_TABLE))
  p.add_argument("--write", action="store_true", help="rewrite the table in block_sizes.py")
  args = p.parse_args()
  table, budgets = dict(block_sizes.TPU_TABLE), dict(block_sizes.VMEM_BUDGET)
  for gen in args.generations:
    table[gen], budgets[gen] = tune(gen)
  text = render(table, budgets)
  print(text)
  if args.write:
    path = block_sizes.__file__
    src = open(path).read()
    start = src.index("# --- TPU_TABLE: written by")
    start = src.index("\n", start) + 1
    end = src.index("# --- end of TPU_TABLE ---")
    with open(path, "w") as f:
      f.write(src[:start] + text + "\n" + src[end:])
    print(f"wrote {path}")


if __name__ == "__main__":
  main()

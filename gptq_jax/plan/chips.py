"""The TPU chips a plan is made for: peak bf16 FLOP/s, HBM capacity and HBM bandwidth per chip.

Values as Google publishes them in each generation's "System architecture" table of the Cloud TPU
documentation, with the unit written there (GB = 10^9 bytes, GiB = 2^30 bytes):

| chip | peak bf16 per chip | HBM per chip | HBM bandwidth | chips per host | source |
|------|--------------------|--------------|---------------|----------------|--------|
| v4   | 275 TFLOPs         | 32 GiB       | 1200 GB/s     | 4              | https://cloud.google.com/tpu/docs/v4 |
| v5e  | 197 TFLOPs         | 16 GB        | 819 GB/s      | 8              | https://cloud.google.com/tpu/docs/v5e |
| v5p  | 459 TFLOPs         | 95 GB        | 2765 GB/s     | 4              | https://cloud.google.com/tpu/docs/v5p |
| v6e  | 918 TFLOPs         | 32 GB        | 1638 GB/s     | 8              | https://cloud.google.com/tpu/docs/v6e |

(v4 and v5p chips hold two TensorCores that JAX presents as one device, "megacore"; v5e and v6e
chips one. A device is a chip in every plan.)
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class Chip:
  generation: str
  peak_flops: float  # bf16 FLOP/s
  hbm_bytes: int
  hbm_bytes_per_s: float
  chips_per_host: int
  megacore: bool = False

  def roofline_seconds(self, flops: float, bytes_accessed: float) -> float:
    """The time a program of ``flops`` and ``bytes_accessed`` takes at best on one chip."""
    return max(flops / self.peak_flops, bytes_accessed / self.hbm_bytes_per_s)


CHIPS = {
    "v4": Chip(generation="v4", peak_flops=275e12, hbm_bytes=32 * 2**30, hbm_bytes_per_s=1200e9,
               chips_per_host=4, megacore=True),
    "v5e": Chip(generation="v5e", peak_flops=197e12, hbm_bytes=16 * 10**9,
                hbm_bytes_per_s=819e9, chips_per_host=8),
    "v5p": Chip(generation="v5p", peak_flops=459e12, hbm_bytes=95 * 10**9,
                hbm_bytes_per_s=2765e9, chips_per_host=4, megacore=True),
    "v6e": Chip(generation="v6e", peak_flops=918e12, hbm_bytes=32 * 10**9,
                hbm_bytes_per_s=1638e9, chips_per_host=8),
}


def chip(generation: str) -> Chip:
  if generation not in CHIPS:
    raise ValueError(f"TPU generation {generation!r}: plans are made for {tuple(CHIPS)}")
  return CHIPS[generation]

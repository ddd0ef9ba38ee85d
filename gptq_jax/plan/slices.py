"""The slice a plan compiles for: a named TPU topology (compile-only, no TPU needed) or the
devices attached to this process.

``compile_only("v5e:2x4")`` asks libtpu's compile-only client for the slice's devices
(``jax.experimental.topologies``; needs ``jax[tpu]``, the ``.venv-tpu`` of scripts/setup_tpu.sh).
Names are libtpu's (``v5e:2x4``, ``v6e:2x4``, ``v5p:2x2x1``, ``v4:2x2x1``) or Cloud's accelerator
types (``v5e-8``, ``v6e-8``, ``v5p-8``, ``v4-8``: for v4 and v5p the number counts TensorCores, two
per chip). ``num_hosts`` splits the chips into hosts (default: as few as the generation's largest
host allows: 8 chips per v5e / v6e host, 4 per v4 / v5p host).
"""

from __future__ import annotations

import dataclasses
import math
import re

from gptq_jax.kernels.block_sizes import generation_of
from gptq_jax.plan.chips import CHIPS, Chip, chip

_LIBTPU_PREFIX = {"v4": "v4", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e"}
_SHAPES_2D = {1: (1, 1), 2: (1, 2), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4)}


@dataclasses.dataclass(frozen=True)
class Slice:
  """``devices``: every device of the slice (a device is a chip); ``local``: process 0's."""

  name: str
  chip: Chip
  devices: tuple
  num_hosts: int

  @property
  def chips(self) -> int:
    return len(self.devices)

  @property
  def local(self) -> tuple:
    first = min(d.process_index for d in self.devices)
    return tuple(d for d in self.devices if d.process_index == first)


def parse(topology: str) -> tuple[str, tuple[int, ...]]:
  """("v5e", (2, 4)) for "v5e:2x4" or "v5e-8"; a ValueError naming the allowed forms else."""
  m = re.fullmatch(r"(v4|v5e|v5p|v6e)[:=]([0-9]+(?:x[0-9]+){1,2})", topology.strip())
  if m:
    return m.group(1), tuple(int(v) for v in m.group(2).split("x"))
  m = re.fullmatch(r"(v4|v5e|v5p|v6e)-([0-9]+)", topology.strip())
  if m:
    gen, n = m.group(1), int(m.group(2))
    chips = n // 2 if CHIPS[gen].megacore else n
    shapes = _SHAPES_3D if gen in ("v4", "v5p") else _SHAPES_2D
    if chips in shapes:
      return gen, shapes[chips]
  raise ValueError(f"--topology {topology!r}: expected a slice like v5e:2x4, v6e:2x4, v5p:2x2x1, "
                   f"v4:2x2x1 (libtpu's names) or v5e-8, v6e-8, v5p-8, v4-8 (Cloud's)")


_HOST_BOXES = {1: ((1, 1, 1),), 2: ((1, 2, 1), (2, 1, 1)), 4: ((2, 2, 1), (1, 4, 1), (4, 1, 1)),
               8: ((2, 4, 1), (4, 2, 1), (2, 2, 2))}


def _host_bounds(dims: tuple[int, ...], per_host: int) -> tuple[int, int, int] | None:
  """chips_per_host_bounds: a box of ``per_host`` chips that tiles the slice (hosts as cabled)."""
  full = tuple(dims) + (1,) * (3 - len(dims))
  for box in _HOST_BOXES.get(per_host, ()):
    if all(f % b == 0 for f, b in zip(full, box)):
      return box
  return None


def compile_only(topology: str, num_hosts: int | None = None) -> Slice:
  """The devices of ``topology`` from libtpu's compile-only client."""
  gen, dims = parse(topology)
  spec = chip(gen)
  chips = math.prod(dims)
  hosts = num_hosts or max(1, chips // spec.chips_per_host)
  if hosts < 1 or chips % hosts or chips // hosts > spec.chips_per_host:
    raise ValueError(f"--num-hosts {num_hosts}: a {gen} host holds at most {spec.chips_per_host} "
                     f"chips and the {chips} chips of {topology} must split evenly; allowed: "
                     f"{[h for h in range(1, chips + 1) if chips % h == 0 and chips // h <= spec.chips_per_host]}")
  bounds = _host_bounds(dims, chips // hosts)
  if bounds is None:
    raise ValueError(f"--num-hosts {hosts}: {chips // hosts} chips per host do not tile {topology}")
  try:
    from jax.experimental import topologies  # noqa: PLC0415
  except ImportError as e:  # pragma: no cover (jax always has it)
    raise ValueError(f"this jax cannot describe TPU slices ({e})") from None
  name = f"{_LIBTPU_PREFIX[gen]}:{'x'.join(map(str, dims))}"
  kwargs = {"chips_per_host_bounds": bounds}
  if spec.megacore:
    kwargs["chip_config_name"] = "megacore"
  try:
    desc = topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs)
  except Exception as e:  # noqa: BLE001 (libtpu missing, or a shape it refuses)
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "lockfile" in text:
      raise ValueError("another process holds libtpu's lock (/tmp/libtpu_lockfile): wait for it, "
                       "or set ALLOW_MULTIPLE_LIBTPU_LOAD=1 (safe when only compiling)") from None
    if "TPU support not installed" in text or "libtpu" in text.lower():
      raise ValueError("compiling for a TPU slice needs libtpu (jax[tpu]): run with "
                       ".venv-tpu/bin/python (built by scripts/setup_tpu.sh)") from None
    raise ValueError(f"--topology {topology!r}: libtpu refused it ({text})") from None
  return Slice(name, spec, tuple(desc.devices), hosts)


def attached(spec: Chip | None = None) -> Slice:
  """The devices this process sees (a TPU VM, or any backend with ``spec`` given)."""
  import jax  # noqa: PLC0415

  devices = tuple(jax.devices())
  if spec is None:
    gen = generation_of(devices[0].device_kind)
    if gen is None:
      raise ValueError(f"the attached devices are {devices[0].device_kind!r}, not a TPU of "
                       f"{tuple(CHIPS)}: name a chip to plan against")
    spec = chip(gen)
  return Slice(f"attached {devices[0].device_kind} x{len(devices)}", spec, devices,
               jax.process_count())

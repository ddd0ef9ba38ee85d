"""The quantize CLI plans before it works: on a TPU, every program of the run is compiled with the
run's shapes (``gptq_jax/plan``) before any block is read, and a run that will not fit stops at
once with one line naming the setting to change (``--batch-size``, ``--seqlen``, ``--nsamples``,
more chips, ...), never hours later.

``GPTQ_JAX_PLAN_HBM_GB`` (a what-if, and how the tests exercise this on CPU): plan on any backend
against that many GB of memory per device (the other chip figures those of the attached TPU
generation, or v5e's).
"""

from __future__ import annotations

import dataclasses
import os

HBM_ENV = "GPTQ_JAX_PLAN_HBM_GB"


def _chip():
  """The chip to plan against, or None when no plan is made (not a TPU, no override)."""
  import jax  # noqa: PLC0415

  from gptq_jax.kernels.block_sizes import DEFAULT_GENERATION, generation_of  # noqa: PLC0415
  from gptq_jax.plan.chips import chip  # noqa: PLC0415

  device = jax.devices()[0]
  gen = generation_of(device.device_kind) if device.platform == "tpu" else None
  override = os.environ.get(HBM_ENV)
  if override:
    try:
      hbm = int(float(override) * 1e9)
    except ValueError:
      raise ValueError(f"{HBM_ENV}={override!r}: expected a number of GB") from None
    return dataclasses.replace(chip(gen or DEFAULT_GENERATION), hbm_bytes=hbm)
  return chip(gen) if gen else None


def check_fits(args, cfg, model_config, dtype: str, say) -> dict | None:
  """Plan the run on the attached devices; raise ValueError with the refusal when it does not
  fit. Returns the plan (None when no plan is made: not a TPU and no ``GPTQ_JAX_PLAN_HBM_GB``)."""
  spec = _chip()
  if spec is None:
    return None
  from gptq_jax.plan import planner, slices  # noqa: PLC0415
  from gptq_jax.plan.layout import RunSettings  # noqa: PLC0415

  evaluating = (getattr(args, "eval_text", None) or "").lower() != "none"
  stash_mb = getattr(args, "stash_mb", None)
  run = RunSettings(model=model_config.replace(dtype=dtype), cfg=cfg, nsamples=cfg.nsamples,
                    seqlen=cfg.seqlen, batch_size=args.batch_size,
                    eval_windows=args.eval_windows if evaluating else 0,
                    stash_bytes=None if stash_mb is None else int(stash_mb * 2**20))
  why = planner.not_plannable(run.model)
  if why:  # Gemma 4: the run goes on unplanned
    say(f"plan: skipped ({why.split(': ', 1)[1]})")
    return None
  plan = planner.plan_quantization(run, slices.attached(spec), with_serving=False)
  if not plan["fits"]:
    raise ValueError(plan["refusal"])
  say(f"plan: peak {planner.fmt_bytes(plan['hbm_peak_bytes_per_chip'])} per chip of "
      f"{planner.fmt_bytes(plan['hbm_bytes_per_chip'])} ('{plan['peak_program']}'); about "
      f"{plan['est_seconds'] / 60:.3g} min at the roofline")
  return plan

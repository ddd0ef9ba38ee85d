"""Everything that runs on a TPU compiles for TPUs, here, with the TPU compiler (libtpu's
compile-only client in .venv-tpu; Mosaic for the Pallas kernel), and the plan (scripts/plan.py)
reports the compiler's own figures.

One .venv-tpu subprocess compiles every case (tests/tpu/worker.py; libtpu starts once) and the
tests read its results. The venv is built by scripts/setup_tpu.sh (called by scripts/setup.sh):
without it these tests skip locally and fail under CI=true.

The real-size plans (Llama-3-8B, -70B) lower every program and read the compiler's figures from
``compiler_figures.json`` beside this file, compiling nothing (tests/tpu/real_size.py says how the
file is keyed and recorded): when a program, the slice or the compiler changed since it was
recorded, those tests fail with one line naming the command that records it again.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from gptq_jax.plan.chips import CHIPS
from tests.interop.helpers import oracle_unavailable
from tests.tpu import real_size
from tests.xla_env import NO_OPT_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIGURES = real_size.FIGURES
TPU_PYTHON = os.environ.get("GPTQ_JAX_TPU_PYTHON", os.path.join(ROOT, ".venv-tpu", "bin", "python"))
BIG_ENV = "GPTQ_JAX_TPU_BIG"  # =1: plan the real-size models even without recorded figures


def _big() -> bool:
  return os.path.isfile(FIGURES) or os.environ.get(BIG_ENV) == "1"


def _tasks(folders: dict) -> list[str]:
  tasks = ["kernels|v5e", "kernels|v6e", "model_shapes|v4", "model_shapes|v5p", "pipeline",
           "moe_pipeline"]
  return tasks + (real_size.tasks(folders) if _big() else [])


def _needs_big() -> None:
  if not _big():
    oracle_unavailable(f"the recorded compiler figures {FIGURES} are absent: record them with "
                       f"`{real_size.RECORD}` (about half an hour of CPU), or set {BIG_ENV}=1")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
  if not os.path.isfile(TPU_PYTHON):
    oracle_unavailable(f"the TPU compiler's venv is absent ({TPU_PYTHON}): build it with "
                       "scripts/setup_tpu.sh")
  tmp = tmp_path_factory.mktemp("tpu")
  folders = real_size.write_configs(str(tmp))
  out = str(tmp / "compiled.json")
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_PLATFORMS", NO_OPT_ENV)}  # the TPU compiler as users have it
  env["PYTHONPATH"] = ROOT
  env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # compile-only: another libtpu process may run beside
  if os.environ.get(BIG_ENV) == "1":  # compile every real-size program
    env["GPTQ_JAX_PLAN_FIGURES"], env["GPTQ_JAX_PLAN_FIGURES_STRICT"] = "", "0"
  else:  # read the recorded figures, compile none
    env["GPTQ_JAX_PLAN_FIGURES"], env["GPTQ_JAX_PLAN_FIGURES_STRICT"] = FIGURES, "1"
  proc = subprocess.run([TPU_PYTHON, "-m", "tests.tpu.worker", out, *_tasks(folders)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=3600)
  if proc.returncode != 0:
    tail = proc.stderr[-2000:]
    if "No module named" in tail:
      oracle_unavailable(f"{TPU_PYTHON} cannot import what the worker needs: {tail[-400:]}")
    raise AssertionError(f"the TPU compile worker failed (rc={proc.returncode}):\n{tail}")
  with open(out) as f:
    results = json.load(f)
  results["_folders"] = folders
  return results


def _result(compiled: dict, task: str) -> dict:
  key = next(k for k in compiled if k == task or k.startswith(task + "|") or task in k)
  r = compiled[key]
  assert "error" not in r, f"{key}:\n{r['error']}"
  if "stale" in r:
    pytest.fail(f"{r['stale']}; record the figures again with `{real_size.RECORD}`",
                pytrace=False)
  return r


@pytest.mark.parametrize("gen", ["v5e", "v6e"])
def test_kernel_compiles_with_mosaic_wherever_can_use_kernel_accepts(compiled, gen):
  r = _result(compiled, f"kernels|{gen}")
  assert "failed" not in r, r.get("failed")
  # every accepted configuration is one Mosaic call in the compiled program
  assert r["accepted_calls"] == len(r["accepted"]) == 36
  # every refused one compiled too, on the XLA path: no Mosaic call
  assert r["refused_calls"] == 0 and len(r["refused"]) > 0
  # the TPU kernel's rule (docs/format.md): 2/4/8 bits, and a group of a multiple of 8 word rows
  def refused(name: str) -> bool:
    bits, gs = int(name.split("bit")[0]), int(name.split(" g")[1].split()[0])
    return bits == 3 or (gs != -1 and gs % (256 // bits) != 0)

  assert all(refused(n) for n in r["refused"]) and not any(refused(n) for n in r["accepted"])


@pytest.mark.parametrize("gen", ["v4", "v5p"])
def test_model_shapes_take_the_kernel_on_v4_and_v5p(compiled, gen):
  r = _result(compiled, f"model_shapes|{gen}")
  assert r["calls"] == r["accepted"] == r["cases"] == 4, r


def _programs(plan: dict) -> dict:
  return {p["name"]: p for p in plan["programs"]}


def test_every_per_block_program_compiles_on_a_2x2_slice(compiled):
  plan = _result(compiled, "pipeline")["plan"]
  phases = {p["phase"] for p in plan["programs"]}
  assert phases == {"embedding", "hessian passes", "solves", "propagation", "refinement"}
  names = _programs(plan)
  for prefix in ("hessian pass 0", "hessian pass 3", "q_proj+k_proj+v_proj: column loop",
                 "down_proj: inverse-Hessian factor", "refinement: training loop", "propagation"):
    assert any(n.startswith(prefix) for n in names), (prefix, sorted(names))
  assert all(p["hbm_bytes"] > 0 for p in plan["programs"])
  assert plan["fits"] and plan["refusal"] is None


def test_the_plan_holds_the_compilers_own_figures(compiled):
  """Per program, the plan's HBM and FLOPs equal memory_analysis() / cost_analysis() of the same
  program compiled directly; the peak and the time are built from them as documented."""
  r = _result(compiled, "pipeline")
  plan, names = r["plan"], _programs(r["plan"])
  for name, direct in r["direct"].items():
    assert names[name]["hbm_bytes"] == direct["hbm_bytes"], name
    assert names[name]["flops"] == direct["flops"] > 0, name
  progs = plan["programs"]
  assert plan["hbm_peak_bytes_per_chip"] == max(p["hbm_bytes"] + sum(p["beside_parts"].values())
                                                for p in progs)
  chip = CHIPS[plan["generation"]]
  per_block = sum(p["calls"] * max(p["flops"] / chip.peak_flops,
                                   p["bytes_accessed"] / chip.hbm_bytes_per_s)
                  for p in progs if p["phase"] != "embedding")
  assert plan["est_seconds_per_block"]["full_attention"] == pytest.approx(per_block, rel=1e-9)
  serving = {row["batch"]: row for row in plan["serving"]}
  assert set(serving) == {1, 8, 64}
  for row in serving.values():
    assert row["packed"]["weight_bytes"] < row["bf16"]["weight_bytes"]
    layer = next(p for p in row["packed"]["programs"] if p["name"].startswith("decode layer"))
    assert layer["kernel_calls"] == 7  # q, k, v, o, gate, up, down: the Mosaic kernel
    layer = next(p for p in row["bf16"]["programs"] if p["name"].startswith("decode layer"))
    assert layer["kernel_calls"] == 0


def test_a_mixture_of_experts_plan_holds_the_compilers_own_figures(compiled):
  """A tiny Qwen3-MoE: the routed Hessian passes, the expert Hessians summed over the chips, the
  experts' batched solves (spread over the host's chips) and the propagation are planned, each
  with the figures of the same program compiled directly; the router stays float (no solve);
  serving is refused in one line."""
  r = _result(compiled, "moe_pipeline")
  plan, names = r["plan"], _programs(r["plan"])
  for name, direct in r["direct"].items():
    assert names[name]["hbm_bytes"] == direct["hbm_bytes"], name
    assert names[name]["flops"] == direct["flops"] > 0, name
  assert {p["phase"] for p in plan["programs"]} == {"embedding", "hessian passes", "solves",
                                                     "propagation"}
  assert "hessian pass 2 [gate, gate_proj, up_proj]" in names
  for proj in ("experts gate_proj+experts up_proj", "experts down_proj"):
    assert names[f"{proj}: prepare (8 experts)"]["calls"] == 1
    assert names[f"{proj}: inverse-Hessian factor"]["calls"] == 8  # expert by expert
  assert not any(n.startswith("gate:") for n in names)  # the router is not quantized
  assert plan["est_seconds_per_block"].keys() == {"full_attention, experts"}
  assert plan["fits"] and plan["hbm_peak_bytes_per_chip"] == max(
      p["hbm_bytes"] + sum(p["beside_parts"].values()) for p in plan["programs"])
  assert plan["serving"] is None and "\n" not in plan["serving_refusal"]
  assert plan["serving_refusal"].startswith("serving: not planned for a mixture of experts")


@pytest.mark.parametrize("task,gen,chips", [("8b", "v5e", 8), ("70b|v6e", "v6e", 8)])
def test_real_size_plans_run(compiled, task, gen, chips):
  _needs_big()
  plan = _result(compiled, f"{compiled['_folders'][task.split('|')[0]]}|{gen}")
  assert plan["generation"] == gen and plan["chips"] == chips
  assert plan["fits"], plan["refusal"]
  assert 0 < plan["hbm_peak_bytes_per_chip"] <= plan["hbm_bytes_per_chip"]
  assert plan["est_seconds"] > 0 and plan["host_peak_bytes"] > 0


def test_a_setting_that_cannot_fit_is_refused_with_the_setting_to_change(compiled):
  _needs_big()
  plan = _result(compiled, "--seqlen|8192|--batch-size|64")
  assert not plan["fits"]
  assert plan["hbm_peak_bytes_per_chip"] > plan["hbm_bytes_per_chip"]
  assert plan["refusal"].startswith("the run needs ") and " use " in plan["refusal"]

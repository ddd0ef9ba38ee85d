"""Runs in .venv-tpu (libtpu's compile-only client): compiles for TPU slices and writes what the
compiler said to a JSON file that tests/tpu/compile_test.py reads. One process for every task, so
libtpu starts once. ``python -m tests.tpu.worker OUT.json TASK...``; each task's result (or its
error) is kept under its name."""

from __future__ import annotations

import itertools
import json
import os
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from gptq_jax.kernels import PreparedWeight, block_sizes, can_use_kernel, quantized_matmul

S = jax.ShapeDtypeStruct
CALL = 'custom_call_target="tpu_custom_call"'
TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=256,
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)


def _weight(k, n, bits, gs, sh, act_order=False, scales=jnp.bfloat16):
  groups = 1 if gs == -1 else -(-k // gs)
  return PreparedWeight(qweight=S((k * bits // 32, n), jnp.int32, sharding=sh),
                        scales=S((groups, n), scales, sharding=sh),
                        zeros=S((groups, n), scales, sharding=sh),
                        perm=S((k,), jnp.int32, sharding=sh) if act_order else None,
                        bits=bits, group_size=gs)


def _compile_all(cases, sh):
  """One program computing every case's ``x @ w``: (compiled HLO text, number of cases)."""
  xs = [S(c["x"], c["dtype"], sharding=sh) for c in cases]
  ws = [c["w"] for c in cases]
  f = jax.jit(lambda xs, ws: [quantized_matmul(x, w, backend="pallas") for x, w in zip(xs, ws)])
  return f.trace(xs, ws).lower().compile().as_text()


def kernels(gen: str) -> dict:
  """Every configuration of the kernel grid: the ones can_use_kernel accepts compile to one
  Mosaic call each; the ones it refuses compile on the XLA path (no Mosaic call)."""
  from gptq_jax.plan import slices

  sh = SingleDeviceSharding(slices.compile_only(f"{gen}:2x2" if gen in ("v5e", "v6e")
                                                else f"{gen}:2x2x1").devices[0])
  accepted, refused = [], []
  with block_sizes.for_generation(gen):
    for bits, gs, m, dtype in itertools.product((2, 3, 4, 8), (32, 64, 128, -1), (1, 256),
                                                (jnp.float32, jnp.bfloat16)):
      act = m == 1 and dtype == jnp.float32  # the act-order permutation (outside the kernel)
      case = {"x": (m, 512), "dtype": dtype, "w": _weight(512, 256, bits, gs, sh, act),
              "name": f"{bits}bit g{gs} m{m} {jnp.dtype(dtype).name}{' act' if act else ''}"}
      ok, why = can_use_kernel(S(case["x"], dtype), case["w"], platform="tpu")
      (accepted if ok else refused).append(case)
    out = {"accepted": [c["name"] for c in accepted], "refused": [c["name"] for c in refused]}
    try:
      out["accepted_calls"] = _compile_all(accepted, sh).count(CALL)
    except Exception:  # noqa: BLE001: name the first configuration that does not compile
      out["accepted_calls"] = -1
      for c in accepted:
        try:
          _compile_all([c], sh)
        except Exception as e:  # noqa: BLE001
          out["failed"] = f"{c['name']}: {str(e).splitlines()[0][:300]}"
          break
    out["refused_calls"] = _compile_all(refused, sh).count(CALL)
  return out


def model_shapes(gen: str) -> dict:
  """The issue's shapes: x [1, 4096] and [256, 4096] against 4096 x 14336, 4 and 8 bits, bf16."""
  from gptq_jax.plan import slices

  topo = f"{gen}:2x2" if gen in ("v5e", "v6e") else f"{gen}:2x2x1"
  sh = SingleDeviceSharding(slices.compile_only(topo).devices[0])
  with block_sizes.for_generation(gen):
    cases = [{"x": (m, 4096), "dtype": jnp.bfloat16, "w": _weight(4096, 14336, bits, 128, sh)}
             for m in (1, 256) for bits in (4, 8)]
    plans = [can_use_kernel(S(c["x"], c["dtype"]), c["w"], platform="tpu") for c in cases]
    return {"cases": len(cases), "accepted": sum(ok for ok, _ in plans),
            "blocks": [why for _, why in plans], "calls": _compile_all(cases, sh).count(CALL)}


def _tiny_settings(**cfg_kw):
  from gptq_jax.config import GPTQConfig
  from gptq_jax.models.config import ModelConfig
  from gptq_jax.plan.layout import RunSettings

  return RunSettings(model=ModelConfig.from_hf_dict(TINY).replace(dtype="bfloat16"),
                     cfg=GPTQConfig(4, group_size=64, **cfg_kw), nsamples=16, seqlen=32,
                     batch_size=8)


def pipeline() -> dict:
  """Every per-block program of a tiny model planned on a v5e 2x2 slice (refinement on), and the
  same programs compiled again directly, outside the plan."""
  from gptq_jax.core import hessian
  from gptq_jax.pipeline.capture import capture_for, runner_for
  from gptq_jax.plan import planner, slices
  from gptq_jax.plan.layout import Layout

  sl = slices.compile_only("v5e:2x2")
  run = _tiny_settings(refine_steps=2)
  plan = planner.plan_quantization(run, sl, with_serving=True)
  lay = Layout(run, sl)  # the same programs, compiled here by hand
  adapter = lay.adapter(None)
  block = lay.block(None, lay.replicated)
  hidden, ctx, mask = lay.stream_batch()
  direct = {}
  group = adapter.sequential_groups[0]
  cap = capture_for(adapter, group, lay.mesh, "data")
  k, n = run.model.hidden_size, sl.chips  # the running sums: one per chip, split over the chips
  state = {group[0]: hessian.HessianState(
      xtx=S((n, k, k), jnp.float32, sharding=lay.data),
      count=S((n,), jnp.float32, sharding=lay.data),
      err=S((n, k, k), jnp.float32, sharding=lay.data))}
  for name, fn, args in (
      ("hessian pass 0 [q_proj, k_proj, v_proj]", cap._step,
       (state, block, hidden, ctx, mask, {}, False)),
      ("propagation", runner_for(adapter, lay.mesh, "data").jitted,
       (block, hidden, ctx, {}))):  # with refinement the propagation reruns the whole block
    c = fn.trace(*args).lower().compile()
    m, cost = c.memory_analysis(), c.cost_analysis()
    direct[name] = {"hbm_bytes": m.argument_size_in_bytes + m.output_size_in_bytes
                    - m.alias_size_in_bytes + m.temp_size_in_bytes
                    + m.generated_code_size_in_bytes, "flops": cost["flops"]}
  return {"plan": plan, "direct": direct}


MOE_TINY = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=256,
                hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6)


def _figures(compiled) -> dict:
  m, cost = compiled.memory_analysis(), compiled.cost_analysis()
  return {"hbm_bytes": m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes + m.generated_code_size_in_bytes, "flops": cost["flops"]}


def moe_pipeline() -> dict:
  """A tiny Qwen3-MoE planned on a v5e 2x2 slice (serving asked for: refused for experts), and
  programs of its expert layers compiled again directly: the routed Hessian pass, the expert
  Hessians summed over the chips, the experts' batched column loop spread over the host's chips,
  the propagation."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from gptq_jax.config import GPTQConfig
  from gptq_jax.core import batched, gptq, hessian
  from gptq_jax.models.config import ModelConfig
  from gptq_jax.pipeline import multihost
  from gptq_jax.pipeline.capture import capture_for, runner_for
  from gptq_jax.plan import planner, slices
  from gptq_jax.plan.layout import Layout, RunSettings

  sl = slices.compile_only("v5e:2x2")
  run = RunSettings(model=ModelConfig.from_hf_dict(MOE_TINY).replace(dtype="bfloat16"),
                    cfg=GPTQConfig(4, group_size=32), nsamples=16, seqlen=32, batch_size=8)
  plan = planner.plan_quantization(run, sl, with_serving=True)
  lay = Layout(run, sl)  # the same programs, built and compiled here by hand
  kind = run.model.layer_kinds[0]
  adapter = lay.adapter(kind)
  block = lay.block(kind, lay.replicated)
  hidden, ctx, mask = lay.stream_batch()
  n, E, inter, d = sl.chips, 8, 32, 64
  data = lambda shape, dtype=jnp.float32: S(shape, dtype, sharding=lay.data)  # noqa: E731
  down = ("mlp", "experts", "down_proj")
  sums = {down: hessian.HessianState(xtx=data((n, E, inter, inter)), count=data((n, E)),
                                     err=data((n, E, inter, inter)))}
  kept = {("self_attn", "o_proj"): data((8, 32, 4 * 16), jnp.bfloat16)}  # pass 1's input, kept
  cap = capture_for(adapter, ((down),), lay.mesh, "data")
  st = gptq._static_of(run.cfg)
  experts = Mesh(np.array(sl.local), ("experts",))
  on = lambda shape, dtype=jnp.float32: S(shape, dtype, sharding=NamedSharding(  # noqa: E731
      experts, P("experts")))
  direct = {}
  for name, fn, args in (
      ("hessian pass 3 [down_proj]", cap._step, (sums, block, hidden, ctx, mask, kept, False)),
      ("combine 3 experts down_proj", multihost._combiner(lay.mesh, "data"), (sums[down],)),
      ("experts gate_proj+experts up_proj: column loop (8 experts over 4 chips)",
       batched._spread_solve(experts, st),
       (on((E, d, 2 * inter)), on((E, d, d)), on((E, d, 2 * inter)), on((E, d, d)),
        on((E, d), jnp.int32))),
      ("propagation", runner_for(adapter, lay.mesh, "data").jitted, (block, hidden, ctx, kept))):
    direct[name] = _figures(fn.trace(*args).lower().compile())
  return {"plan": plan, "direct": direct}


def big(model: str, topology: str, *argv: str) -> dict:
  """scripts/plan.py's plan (no serving) of a real-size model, with extra flags ``argv``, its
  figures read from $GPTQ_JAX_PLAN_FIGURES (tests/tpu/real_size.py; with
  $GPTQ_JAX_PLAN_FIGURES_STRICT=1 nothing is compiled)."""
  from gptq_jax.cli import plan as cli_plan

  figures = os.environ.get("GPTQ_JAX_PLAN_FIGURES", "")
  strict = ["--figures-only"] if os.environ.get("GPTQ_JAX_PLAN_FIGURES_STRICT") == "1" else []
  args = cli_plan._parser().parse_args(["--model", model, "--topology", topology, "--no-serving",
                                        "--figures", figures, *strict, *argv])
  plan = cli_plan.run(args)
  plan.pop("programs")
  return plan


TASKS = {"kernels": kernels, "model_shapes": model_shapes, "pipeline": pipeline,
         "moe_pipeline": moe_pipeline, "big": big}


def main(out_path: str, *tasks: str) -> None:
  from gptq_jax.plan import measure

  results = {}
  for task in tasks:
    measure.use_figures_file(None)  # every task but "big" compiles everything
    name, *args = task.split("|")
    try:
      results[task] = TASKS[name](*args)
    except measure.FiguresMissing as e:  # recorded figures out of date: one line, no traceback
      results[task] = {"stale": str(e)}
    except Exception:  # noqa: BLE001: the test names the task and prints this
      results[task] = {"error": traceback.format_exc()[-3000:]}
  with open(out_path, "w") as f:
    json.dump(results, f, default=str)


if __name__ == "__main__":
  np.set_printoptions(linewidth=200)
  main(*sys.argv[1:])

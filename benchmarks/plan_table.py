"""The docs/scale.md table of TPU plans: models on v5e-8, v6e-8 and v5p-8, compiled here.

  .venv-tpu/bin/python benchmarks/plan_table.py [--models llama3-8b qwen3-32b llama3-70b
      qwen3-30b-a3b]
      [--slices v5e-8 v6e-8 v5p-8] [--nsamples 128 --seqlen 2048] [--figures FILE]

Each row is ``scripts/plan.py``'s plan (gptq_jax/plan) of a 4-bit g128 run (bfloat16, 128 x 2048
calibration tokens by default) on the slice: the compiler's HBM peak per chip, the host memory by
accounting, the quantization time at the roofline, and one decode step of the packed model against
bf16 at batch 1 and 64 (tokens per second per chip at the roofline). Compiler figures and
rooflines, not runs. The configs are written here from the models' published sizes; another model
is one more entry of ``MODELS`` (any family ``ModelConfig`` reads). Rows are printed as they come;
compiler figures are kept in ``--figures`` so a second run compiles only what changed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gptq_jax.cli import plan as cli_plan  # noqa: E402

_LLAMA3 = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
               rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
               num_key_value_heads=8, tie_word_embeddings=False, torch_dtype="bfloat16")
MODELS = {  # published sizes (the models' config.json)
    "llama3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32),
    "qwen3-32b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936,
                      hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                      num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                      rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, torch_dtype="bfloat16"),
    "llama3-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64),
    # a mixture of experts: 128 experts of 768, 8 per token, every layer sparse
    "qwen3-30b-a3b": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                          vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, rope_theta=1000000.0, max_position_embeddings=40960,
                          rms_norm_eps=1e-6, tie_word_embeddings=False, torch_dtype="bfloat16"),
}
GiB = 2**30


def row(name: str, plan: dict) -> str:
  serve = {r["batch"]: r for r in plan.get("serving") or ()}

  def decode(b):
    if b not in serve:
      return "not planned (experts)" if plan.get("serving_refusal") else "-"
    r = serve[b]
    return (f"{r['packed']['tokens_per_s_per_chip']:,.0f} vs {r['bf16']['tokens_per_s_per_chip']:,.0f}"
            f" ({r['speedup']:.2f}x)")

  return (f"| {name} | {plan['topology']} | {plan['hbm_peak_bytes_per_chip'] / GiB:.1f} of "
          f"{plan['hbm_bytes_per_chip'] / GiB:.1f} GiB{'' if plan['fits'] else ' (does not fit)'} | "
          f"{plan['host_peak_bytes'] / GiB:.1f} GiB | {plan['est_seconds'] / 60:.1f} min | "
          f"{decode(1)} | {decode(64)} |")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  p.add_argument("--slices", nargs="+", default=["v5e-8", "v6e-8", "v5p-8"])
  p.add_argument("--nsamples", type=int, default=128)
  p.add_argument("--seqlen", type=int, default=2048)
  p.add_argument("--figures", default=None)
  p.add_argument("--json", metavar="FILE", help="also write every plan (without programs) here")
  args = p.parse_args()
  print("| model | slice | HBM peak per chip (compiler) | host memory | quantization at the "
        "roofline | decode batch 1, tokens/s per chip: packed vs bf16 | decode batch 64 |")
  print("|---|---|---|---|---|---|---|", flush=True)
  plans = []
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.models:
      folder = os.path.join(tmp, name)
      os.makedirs(folder)
      with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(MODELS[name], f)
      for sl in args.slices:
        argv = ["--model", folder, "--topology", sl, "--nsamples", str(args.nsamples),
                "--seqlen", str(args.seqlen)]
        if args.figures is not None:
          argv += ["--figures", args.figures]
        plan = cli_plan.run(cli_plan._parser().parse_args(argv))
        plan.pop("programs")
        plan["model"] = name
        plans.append(plan)
        print(row(name, plan), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(plans, f, indent=1, default=str)


if __name__ == "__main__":
  main()

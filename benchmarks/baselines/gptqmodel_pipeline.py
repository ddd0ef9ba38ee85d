"""GPTQModel's end-to-end quantization of a float Hugging Face folder (run with .venv-gptqmodel).

    gptqmodel_pipeline.py SRC CALIB.npy EVAL.npy OUT --seqlen 512 --desc-act 0 --damp 0.1
        [--batch-size 1] [--float-ppl 1]

SRC: a float32 HF folder (any family GPTQModel knows) with its tokenizer; CALIB.npy: int token rows
`[nsamples, seqlen]` (used as they are); EVAL.npy: int token windows `[n, seqlen]` scored as they are
(or a 1-D array cut into non-overlapping `seqlen` windows).
Loads SRC in float32 on CPU, quantizes with `GPTQModel.quantize` (4-bit, group 128, sym,
true-sequential, damp / damp_auto_increment as given, mse 0, act_group_aware = not desc_act, no
static groups, no offloading to disk) and times that call alone; records the peak RSS; saves the
GPTQ folder to OUT, reloads it with GPTQModel's torch kernel (float16 load, then cast to float32)
and measures perplexity on the evaluation windows (and, with --float-ppl 1, the float SRC's with
the same evaluator in transformers, to cross-check the two evaluators). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

from _common import emit_json, log, peak_rss_mb


def perplexity(model, tokens: np.ndarray, seqlen: int) -> float:
  """exp(mean NLL) of positions 1..seqlen-1 of each non-overlapping window (as gptq_jax.eval)."""
  if tokens.ndim == 1:
    tokens = tokens[: tokens.shape[0] // seqlen * seqlen].reshape(-1, seqlen)
  windows = tokens.astype(np.int64)
  nll, count = 0.0, 0
  with torch.inference_mode():
    for row in windows:
      ids = torch.from_numpy(row[None])
      logits = model(ids, use_cache=False).logits[0, :-1].float()
      logp = torch.log_softmax(logits, dim=-1)
      nll -= float(logp.gather(1, ids[0, 1:, None]).sum(dtype=torch.float64))
      count += seqlen - 1
  return math.exp(nll / count)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("src")
  ap.add_argument("calib")
  ap.add_argument("eval")
  ap.add_argument("out")
  ap.add_argument("--seqlen", type=int, required=True)
  ap.add_argument("--desc-act", type=int, default=0)
  ap.add_argument("--damp", type=float, default=0.1)
  ap.add_argument("--batch-size", type=int, default=1)
  ap.add_argument("--float-ppl", type=int, default=1)
  args = ap.parse_args()

  import gptqmodel
  from gptqmodel import BACKEND, GPTQModel
  from gptqmodel.quantization.config import GPTQConfig as GPTQModelConfig

  calib_ids = np.load(args.calib)
  eval_ids = np.load(args.eval)
  qcfg = GPTQModelConfig(bits=4, group_size=128, sym=True, desc_act=bool(args.desc_act),
                         act_group_aware=not args.desc_act, damp_percent=args.damp,
                         damp_auto_increment=0.01, mse=0.0, static_groups=False,
                         true_sequential=True, format="gptq", offload_to_disk=False)
  t0 = time.perf_counter()
  model = GPTQModel.load(args.src, qcfg, device="cpu", dtype=torch.float32)
  load_s = time.perf_counter() - t0
  rss_loaded = peak_rss_mb()
  result = {"baseline": f"GPTQModel {gptqmodel.__version__} (torch {torch.__version__}, "
                        f"{torch.get_num_threads()} threads)", "load_s": load_s,
            "batch_size": args.batch_size,
            "config": {"bits": 4, "group_size": 128, "sym": True, "desc_act": bool(args.desc_act),
                       "act_group_aware": not args.desc_act, "damp_percent": args.damp,
                       "damp_auto_increment": 0.01, "mse": 0.0, "true_sequential": True,
                       "static_groups": False, "offload_to_disk": False}}
  calib = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calib_ids]
  t0 = time.perf_counter()
  model.quantize(calib, batch_size=args.batch_size)
  result["quantize_s"] = time.perf_counter() - t0
  result["peak_rss_mb"] = peak_rss_mb()
  result["rss_before_quantize_mb"] = rss_loaded
  log(f"GPTQModel side: quantize {result['quantize_s']:.1f}s, peak RSS "
      f"{result['peak_rss_mb']:.0f} MiB")
  t0 = time.perf_counter()
  model.save(args.out)
  result["save_s"] = time.perf_counter() - t0  # load + quantize + save: the CLI comparison
  del model
  reloaded = GPTQModel.load(args.out, device="cpu", backend=BACKEND.GPTQ_TORCH,
                            dtype=torch.float16)
  reloaded.model.float()
  t0 = time.perf_counter()
  result["ppl_gptq"] = perplexity(reloaded.model, eval_ids, args.seqlen)
  log(f"GPTQModel side: quantized perplexity {result['ppl_gptq']:.4f} "
      f"({time.perf_counter() - t0:.1f}s)")
  if args.float_ppl:  # after the RSS reading: the same evaluator on the float model
    import transformers

    del reloaded
    float_model = transformers.AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32)
    result["ppl_float"] = perplexity(float_model.eval(), eval_ids, args.seqlen)
    log(f"GPTQModel side: float perplexity {result['ppl_float']:.4f}")
  emit_json(result)


if __name__ == "__main__":
  main()

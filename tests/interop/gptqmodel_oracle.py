"""The GPTQModel side of the interop tests, run with .venv-gptqmodel's python (never imported).

  python gptqmodel_oracle.py logits IDS.npy OUT.npz FOLDER...
      Loads each GPTQ folder with GPTQModel on CPU with its torch kernel (BACKEND.GPTQ_TORCH:
      TorchLinear dequantizes the packed int32 weights and multiplies). That kernel only accepts
      float16 / bfloat16 at load, so the model is loaded in float16 and then cast to float32
      (the float tensors are exported as float16, so nothing is lost) to compare at float32
      precision. Writes logits [batch, seq, vocab] per folder ("logits_<k>") and, per folder, the
      quant-linear class used or the error that stopped it ("status_<k>").

  python gptqmodel_oracle.py from_pretrained IDS.npy OUT.npz FOLDER...
      The same with plain transformers: ``AutoModelForCausalLM.from_pretrained(folder)``, so the
      folder's quantization_config goes through transformers' GPTQConfig validation and Optimum's
      GPTQQuantizer (GPTQModel installed underneath). Only the kernel is chosen (``backend="torch"``,
      a loading attribute transformers lets the caller set): the automatic choice on an AVX-512 CPU
      JIT-compiles a C++ extension for minutes. Model loaded in float16, then cast to float32.
      Mixtures of experts (qwen3_moe, qwen2_moe, mixtral): transformers 5 holds a layer's experts
      as one fused parameter and Optimum replaces only ``nn.Linear`` modules, so it cannot load
      per-expert GPTQ tensors (it reports them UNEXPECTED and leaves the experts random); GPTQModel's
      ``defuser.replace_fused_blocks(model_type)`` first swaps in one module per expert (what
      GPTQModel.load does), then ``from_pretrained`` runs as for a dense model.

  python gptqmodel_oracle.py COMMAND ARGS... -- COMMAND ARGS...
      Several of the commands below, one after the other in one process.

  python gptqmodel_oracle.py quantize SRC IDS.npy OUT BITS GROUP_SIZE DESC_ACT FORMAT
      Quantizes the float HF folder SRC with GPTQModel on the calibration token rows of IDS.npy
      and saves the GPTQ folder to OUT; then reloads OUT with the torch kernel and writes each
      quantized linear's dequantized weight [in, out] (float32) to OUT/dequantized.npz.
      SRC and OUT may be comma-separated lists of equal length (one process for several folders:
      importing GPTQModel costs seconds).

The caller sets TORCH_COMPILE_DISABLE=1 (torch.compile only speeds up the same dequantization and
costs a minute of C++ compilation per run on CPU) and GPTQMODEL_CPU_WORKERS=2 (GPTQModel 7.7 sizes
its CPU pool as ceil(cores / 2) but its model loader asks for 2 workers: quantizing fails on a
2-core machine with "requests 2 workers but parent 'cpu' only has 1").
"""

import sys
import traceback

import numpy as np
import torch


MOE_MODEL_TYPES = ("qwen3_moe", "qwen2_moe", "mixtral")


def logits(ids_path, out_path, folders):
  from gptqmodel import BACKEND, GPTQModel

  ids = torch.tensor(np.load(ids_path).astype(np.int64))
  out = {}
  for k, folder in enumerate(folders):
    try:
      model = GPTQModel.load(folder, device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16)
      kinds = sorted({type(m).__name__ for m in model.model.modules() if hasattr(m, "qweight")})
      model.model.float()
      with torch.no_grad():
        out[f"logits_{k}"] = model.model(ids).logits.float().numpy()
      out[f"status_{k}"] = np.array("ok:" + ",".join(kinds))
    except Exception:  # noqa: BLE001 (reported to the test, which skips saying why)
      out[f"status_{k}"] = np.array("error:" + traceback.format_exc(limit=3)[-1500:])
  np.savez(out_path, **out)


def from_pretrained(ids_path, out_path, folders):
  import json

  import transformers

  ids = torch.tensor(np.load(ids_path).astype(np.int64))
  out = {}
  for k, folder in enumerate(folders):
    try:
      with open(f"{folder}/config.json") as f:
        config = json.load(f)
      bits = config["quantization_config"]["bits"]
      if config["model_type"] in MOE_MODEL_TYPES:
        import defuser

        defuser.replace_fused_blocks(config["model_type"])
      loading = transformers.GPTQConfig(bits=bits, backend="torch")  # only the kernel is taken
      model = transformers.AutoModelForCausalLM.from_pretrained(
          folder, device_map="cpu", dtype=torch.float16, quantization_config=loading)
      kinds = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
      torch.nn.Module.float(model)  # transformers refuses .float() on a quantized model
      with torch.no_grad():
        out[f"logits_{k}"] = model(ids).logits.float().numpy()
      out[f"status_{k}"] = np.array("ok:" + ",".join(kinds))
    except Exception:  # noqa: BLE001 (reported to the test)
      out[f"status_{k}"] = np.array("error:" + traceback.format_exc(limit=3)[-1500:])
  np.savez(out_path, **out)


def quantize(srcs, ids_path, outs, bits, group_size, desc_act, fmt):
  srcs, outs = srcs.split(","), outs.split(",")
  if len(srcs) != len(outs):
    raise SystemExit(f"{len(srcs)} source folders but {len(outs)} output folders")
  for src, out in zip(srcs, outs):
    _quantize_one(src, ids_path, out, bits, group_size, desc_act, fmt)


def _quantize_one(src, ids_path, out, bits, group_size, desc_act, fmt):
  from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

  ids = np.load(ids_path)
  qcfg = QuantizeConfig(bits=int(bits), group_size=int(group_size), desc_act=desc_act == "1",
                        act_group_aware=False, sym=True, format=fmt)
  model = GPTQModel.load(src, qcfg, device="cpu")
  calib = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids]
  model.quantize(calib, batch_size=1)
  model.save(out)
  reloaded = GPTQModel.load(out, device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16)
  reloaded.model.float()  # scales to float32: scale * (q - zero) is then exact, as ours
  with torch.no_grad():
    weights = {name: m.dequantize_weight().float().numpy()
               for name, m in reloaded.model.named_modules() if hasattr(m, "qweight")}
  np.savez(f"{out}/dequantized.npz", **weights)


def _run(cmd, args):
  if cmd == "logits":
    logits(args[0], args[1], args[2:])
  elif cmd == "from_pretrained":
    from_pretrained(args[0], args[1], args[2:])
  elif cmd == "quantize":
    quantize(*args)
  else:
    raise SystemExit(f"unknown command {cmd!r}: use logits, from_pretrained or quantize")


if __name__ == "__main__":
  # Several commands separated by "--" run one after the other in this process (importing
  # GPTQModel and torch once costs seconds).
  argv, start = sys.argv[1:] + ["--"], 0
  for k, arg in enumerate(argv):
    if arg == "--":
      _run(argv[start], argv[start + 1:k])
      start = k + 1

"""gptq_jax.load_model / open_model read every format and say what they found; perplexity.py gives
the same number on an orbax checkpoint and on its Hugging Face GPTQ export."""

import importlib.util
import logging
import os

import numpy as np
import pytest

import gptq_jax
from gptq_jax import checkpoint, loading, models
from gptq_jax.core.weights import PackedWeight
from gptq_jax.interop import export_hf
from gptq_jax.models import save_hf_folder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _perplexity_main():
  spec = importlib.util.spec_from_file_location("perplexity_script",
                                                os.path.join(ROOT, "scripts", "perplexity.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


def test_every_format_loads_and_says_what_it_is(tiny_llama, quantized, tmp_path, caplog):
  cfg, params, ids = tiny_llama
  qcfg, qparams = quantized(4, False)
  orbax, v2, floatdir = str(tmp_path / "ckpt"), str(tmp_path / "v2"), str(tmp_path / "float")
  checkpoint.save(orbax, qparams, model_config=cfg, quant_config=qcfg)
  export_hf(v2, qparams, cfg, qcfg.replace(format="gptq_v2"))
  save_hf_folder(floatdir, cfg, params)
  expected = {orbax: ("orbax", "orbax checkpoint (gptq: gptq, 4-bit g32)"),
              v2: ("hf_gptq", "HF GPTQ folder (gptq_v2, 4-bit g32)"),
              floatdir: ("hf_float", "HF float folder (llama)")}
  for spec, (kind, description) in expected.items():
    with caplog.at_level(logging.INFO, logger="gptq_jax"):
      loaded = gptq_jax.open_model(spec)
    assert (loaded.kind, loaded.description) == (kind, description)
    assert f"{spec}: {description}" in caplog.text
    kernel = loaded.params["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(kernel, PackedWeight) == (kind != "hf_float")
    config, _ = gptq_jax.load_model(spec)
    assert config.replace(backend="auto") == cfg
  assert checkpoint.load(orbax).model_config.replace(backend="auto") == cfg
  with pytest.raises(FileNotFoundError, match="gptq_jax.load_model reads every other"):
    checkpoint.load(v2)  # our own format only; gptq_jax.load_model reads the others
  for spec in (orbax, v2):
    with pytest.raises(ValueError, match="reads float models only"):
      models.load_model(spec)
  assert loading.detect("smollm2-135m")[0] == "gguf"
  with pytest.raises(FileNotFoundError, match="neither a gptq_jax checkpoint"):
    loading.detect(str(tmp_path))


def test_perplexity_same_on_checkpoint_and_its_export(tiny_llama, quantized, tmp_path, capsys):
  cfg, params, ids = tiny_llama
  qcfg, qparams = quantized(3, True)
  orbax, hf, floatdir = str(tmp_path / "ckpt"), str(tmp_path / "hf"), str(tmp_path / "float")
  checkpoint.save(orbax, qparams, model_config=cfg, quant_config=qcfg)
  export_hf(hf, qparams, cfg, qcfg)
  save_hf_folder(floatdir, cfg, params)
  tokens = str(tmp_path / "tokens.npy")
  np.save(tokens, ids.reshape(-1))
  main = _perplexity_main()
  ppl = {name: main(["--model", path, "--tokens", tokens, "--seqlen", "32", "--max-windows", "4"])
         ["ppl"] for name, path in (("orbax", orbax), ("hf", hf), ("float", floatdir))}
  err = capsys.readouterr().err
  assert f"{hf}: HF GPTQ folder (gptq, 3-bit g32, act-order)" in err
  # The export stores scales and float tensors in float16: equal up to that rounding.
  assert abs(ppl["hf"] / ppl["orbax"] - 1) < 1e-3, ppl
  assert abs(ppl["float"] / ppl["orbax"] - 1) > 2e-3, ppl  # a quantized model, not the float one (random tiny model: ~9e-3)


def test_perplexity_script_checks_its_text_before_the_model(tmp_path):
  """A missing --text fails at once, naming it, though the model would fail too (and is never
  opened); --text sotu-eval names the bundled held-out addresses."""
  main = _perplexity_main()
  with pytest.raises(FileNotFoundError, match=r"--text '.*nope.txt' does not exist .*'sotu-eval'"):
    main(["--model", str(tmp_path / "no-model"), "--text", str(tmp_path / "nope.txt"),
          "--seqlen", "8"])
  with pytest.raises(ValueError, match="--seqlen=1 is invalid"):
    main(["--model", str(tmp_path / "no-model"), "--text", "sotu-eval", "--seqlen", "1"])
  with pytest.raises(FileNotFoundError, match="no-model"):  # the text passed: now the model
    main(["--model", str(tmp_path / "no-model"), "--text", "sotu-eval", "--seqlen", "8"])

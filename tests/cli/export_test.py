"""scripts/export.py and quantize_llama.py's serving flags on a tiny Llama folder: export.py on the
orbax checkpoint writes the folder ``--save-hf`` wrote in the quantize run (every file, byte for
byte); ``--target`` / ``--group-size auto`` / ``--hf-format`` are checked before any work and
refused with one line naming the setting to change."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from gptq_jax.cli import export
from gptq_jax.cli.quantize import main as quantize_main
from gptq_jax.interop.hf_gptq import read_quantization_config
from tests.cli.conftest import FAST, cli

CT = "compressed-tensors"


def _files(folder) -> dict[str, bytes]:
  out = {}
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), "rb") as f:
      out[name] = f.read()
  return out


def _tensors(folder) -> dict[str, np.ndarray]:
  from gptq_jax.models.hf import HFCheckpoint  # noqa: PLC0415

  ckpt = HFCheckpoint(folder)
  try:
    return {name: np.array(ckpt.get(name)) for name in ckpt.tensor_names()}
  finally:
    ckpt.close()


def _fast(**changes) -> list[str]:
  args = list(FAST)
  for flag, value in changes.items():
    args[args.index(flag) + 1] = value
  return args


@pytest.fixture(scope="module")
def ct_run(tiny_hf_dir, cli_env, tmp_path_factory):
  """One quantize run: act-order with static groups, --group-size auto for --target vllm, and a
  compressed-tensors --save-hf."""
  work = tmp_path_factory.mktemp("ct_run")
  out, hf = str(work / "q"), str(work / "hf")
  proc = cli(["--model", tiny_hf_dir, "--output", out, *_fast(**{"--group-size": "auto"}),
              "--static-groups", "--target", "vllm", "--save-hf", hf, "--hf-format", CT], cli_env)
  assert proc.returncode == 0, proc.stderr
  return out, hf, proc


def test_auto_group_and_target_are_said_before_the_work(ct_run):
  _, hf, proc = ct_run
  assert "--group-size auto: 64 (the largest of (128, 64, 32) that --target vllm runs)" in \
      proc.stderr  # the tiny model's inputs are 64: 128 does not divide them
  assert proc.stderr.index("--target vllm: vLLM Marlin (GPU) can run") < proc.stderr.index(
      "saved ")
  with open(os.path.join(hf, "config.json")) as f:
    qc = json.load(f)["quantization_config"]
  weights = qc["config_groups"]["group_0"]["weights"]
  assert (qc["quant_method"], weights["group_size"], weights["actorder"]) == (CT, 64, "weight")
  assert "serving engines for" in proc.stdout
  assert re.search(r"vLLM Marlin \(GPU\) +yes", proc.stdout), proc.stdout
  with open(os.path.join(hf, "serving_engines.json")) as f:
    rows = {r["engine"]: r for r in json.load(f)["engines"]}
  assert rows["vLLM Marlin (GPU)"]["runs"] and not rows["tpu-inference (TPU)"]["runs"]
  assert "tpu-inference" in rows["tpu-inference (TPU)"]["rules_from"]


def test_export_of_the_checkpoint_is_the_save_hf_folder(ct_run, tmp_path, capsys):
  out, hf, _ = ct_run
  again = str(tmp_path / "again")
  assert export.main(["--model", out, "--output", again, "--hf-format", CT]) == 0
  assert "vLLM CPU" in capsys.readouterr().out
  want, got = _files(hf), _files(again)
  assert sorted(got) == sorted(want) and "tokenizer.json" in got
  assert "model.safetensors.index.json" in got  # one shard per block, as --save-hf writes
  for name in want:
    assert got[name] == want[name], name


def test_export_converts_between_layouts_without_requantizing(ct_run, tmp_path, capsys):
  """compressed-tensors folder -> GPTQ folder -> compressed-tensors folder: the same tensors."""
  _, hf, _ = ct_run
  gptq, back = str(tmp_path / "gptq"), str(tmp_path / "back")
  assert export.main(["--model", hf, "--output", gptq]) == 0
  assert export.main(["--model", gptq, "--output", back, "--hf-format", CT]) == 0
  want, got = _tensors(hf), _tensors(back)
  assert sorted(got) == sorted(want)
  for name in want:
    assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), name
  assert export.main(["--check", gptq]) == 0
  out = capsys.readouterr().out
  # act-order with static groups: the GPTQ folder says desc_act=false (its g_idx is in input
  # order), which vLLM 0.32 serves; the act order is kept under meta and read back
  assert re.search(r"vLLM Marlin \(GPU\) +yes", out), out
  with open(os.path.join(gptq, "config.json")) as f:
    qc = json.load(f)["quantization_config"]
  assert qc["desc_act"] is False and qc["meta"]["desc_act"] is True and qc["static_groups"]
  back_cfg = read_quantization_config(gptq)
  assert back_cfg.desc_act and back_cfg.static_groups


REFUSED = [
    (["--target", "vllm", "--group-size", "128", "--no-desc-act"],
     r"--target vllm: vLLM Marlin \(GPU\): .*64 inputs are not a multiple of group_size 128.*"
     r"\(change: --group-size 64\)"),
    (["--target", "vllm", "--no-sym", "--no-desc-act"], r"4-bit asymmetric.*\(change: --sym\)"),
    (["--target", "vllm"], r"desc_act=True.*\(change: --static-groups\)"),
    (["--target", "tpu-inference"], "tpu-inference has no GPTQ loader"),
    (["--group-size", "auto"], "--group-size auto picks the group size the --target engine runs"),
    (["--hf-format", CT], "--hf-format sets the layout of the --save-hf folder"),
    (["--hf-format", CT, "--save-hf", "{tmp}/hf", "--bits", "3"], "stores 4- or 8-bit weights"),
    (["--hf-format", CT, "--save-hf", "{tmp}/hf"], "cannot store act-order groups"),
]


@pytest.mark.parametrize("change,message", REFUSED, ids=[" ".join(c) for c, _ in REFUSED])
def test_serving_flags_refused_before_any_work(change, message, tiny_hf_dir, tmp_path, capsys):
  args = ["--model", tiny_hf_dir, "--output", str(tmp_path / "q"), *FAST]
  assert quantize_main(args + [c.format(tmp=tmp_path) for c in change]) == 2
  err = capsys.readouterr().err
  assert re.search(message, err.splitlines()[-1]), err
  assert "saved" not in err and os.listdir(tmp_path) == []


def test_export_refusals(tiny_hf_dir, tmp_path, capsys):
  assert export.main(["--model", tiny_hf_dir, "--output", str(tmp_path / "x")]) == 2
  assert "is a float model" in capsys.readouterr().err
  assert export.main(["--output", str(tmp_path / "x")]) == 2
  assert "pass --model CHECKPOINT and --output DIR" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "x")

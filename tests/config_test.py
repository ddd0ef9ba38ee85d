"""GPTQConfig: defaults, validation messages, field interactions, HF dict round trip."""

import dataclasses
import warnings

import pytest

from gptq_jax import GPTQConfig
from tests.interop.helpers import importorskip


def test_defaults_are_optimums():
  c = GPTQConfig(4)
  assert (c.bits, c.dataset, c.group_size, c.damp_percent, c.desc_act, c.act_group_aware, c.sym,
          c.true_sequential, c.format, c.backend) == (4, None, 128, 0.1, False, True, True, True,
                                                      "gptq", "auto")
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.bits = 3  # type: ignore[misc]
  with pytest.raises(TypeError):
    GPTQConfig(4, 128)  # everything after bits is keyword-only


@pytest.mark.parametrize("kwargs, field, allowed", [
    (dict(bits=5), "bits", "one of (2, 3, 4, 8)"),
    (dict(bits=True), "bits", "one of"),
    (dict(bits=4.0), "bits", "one of"),
    (dict(bits=4, group_size=0), "group_size", "-1"),
    (dict(bits=4, group_size=-2), "group_size", "-1"),
    (dict(bits=4, group_size=True), "group_size", "int > 0"),
    (dict(bits=4, damp_percent=0), "damp_percent", "0 < damp_percent < 1"),
    (dict(bits=4, damp_percent=1.0), "damp_percent", "0 < damp_percent < 1"),
    (dict(bits=4, damp_percent="0.1"), "damp_percent", "0 < damp_percent < 1"),
    (dict(bits=4, desc_act=1), "desc_act", "a bool"),
    (dict(bits=4, sym="yes"), "sym", "a bool"),
    (dict(bits=4, format="gptq_v3"), "format", "gptq_v2"),
    (dict(bits=4, backend="cuda"), "backend", "pallas_interpret"),
    (dict(bits=4, dataset="wikitxt2"), "dataset", "wikitext2"),
    (dict(bits=4, dataset=["ok", 3]), "dataset", "list of strings"),
    (dict(bits=4, dataset=[]), "dataset", "non-empty"),
    (dict(bits=4, dataset=5), "dataset", "list of strings"),
    (dict(bits=4, block_size=0), "block_size", "int > 0"),
    (dict(bits=4, nsamples=-1), "nsamples", "int > 0"),
    (dict(bits=4, seqlen=2.5), "seqlen", "int > 0"),
    (dict(bits=4, seed=-1), "seed", ">= 0"),
    (dict(bits=4, mse=-1.0), "mse", "norm exponent"),
    (dict(bits=4, mse_weight="diag"), "mse_weight", "hessian"),
    (dict(bits=4, refine_steps=-5), "refine_steps", "int >= 0"),
    (dict(bits=4, refine_steps=1.5), "refine_steps", "int >= 0"),
    (dict(bits=4, refine_lr=0.0), "refine_lr", "> 0"),
    (dict(bits=4, refine_rounding="no"), "refine_rounding", "a bool"),
    (dict(bits=4, refine_batch=0), "refine_batch", "int > 0"),
    (dict(bits=4, refine_seqlen=-1), "refine_seqlen", "int >= 0"),
    (dict(bits=4, damp_auto_increment=1.5), "damp_auto_increment", "[0, 1)"),
    (dict(bits=4, group_size=-1, static_groups=True), "static_groups", "group_size=-1"),
])
def test_bad_values_name_field_value_and_allowed(kwargs, field, allowed):
  bits = kwargs.pop("bits")
  with pytest.raises(ValueError) as e:
    GPTQConfig(bits, **kwargs)
  msg = str(e.value)
  assert f"GPTQConfig.{field}=" in msg and allowed in msg
  if kwargs:
    assert repr(next(iter(kwargs.values())))[:20] in msg or field == "dataset"


def test_dataset_forms(tmp_path):
  f = tmp_path / "calib.txt"
  f.write_text("hello world")
  assert GPTQConfig(4, dataset="c4").dataset == "c4"
  assert GPTQConfig(4, dataset=str(f)).dataset == str(f)
  assert GPTQConfig(4, dataset=["a b", "c d"]).dataset == ("a b", "c d")


def test_desc_act_disables_gar_with_a_warning():
  with pytest.warns(UserWarning, match="act_group_aware has been disabled"):
    c = GPTQConfig(4, desc_act=True)
  assert c.desc_act and not c.act_group_aware
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert not GPTQConfig(4, desc_act=True, act_group_aware=False).act_group_aware
    assert not GPTQConfig(4, group_size=-1).act_group_aware  # no groups, nothing to reorder


def test_v1_asym_warns_and_limits_zero():
  with pytest.warns(UserWarning, match="cannot store an asymmetric zero point of 0"):
    c = GPTQConfig(4, sym=False)
  assert c.min_zero == 1
  assert GPTQConfig(4, sym=False, format="gptq_v2").min_zero == 0
  assert GPTQConfig(4).min_zero == 0


def test_hf_dict_round_trip():
  c = GPTQConfig(3, group_size=64, damp_percent=0.05, desc_act=True, act_group_aware=False,
                 sym=True, true_sequential=False, format="gptq_v2", static_groups=True,
                 dataset=["x y"], seqlen=512, nsamples=16, mse=2.4, mse_weight="hessian",
                 block_size=64,
                 refine_steps=50, refine_lr=5e-3, refine_rounding=True, refine_batch=2,
                 refine_seqlen=64)
  d = c.to_dict()
  assert d["gptq_jax"]["refine_steps"] == 50 and d["gptq_jax"]["refine_rounding"] is True
  assert d["gptq_jax"]["refine_seqlen"] == 64
  assert d["quant_method"] == "gptq" and d["checkpoint_format"] == "gptq_v2"
  assert d["bits"] == 3 and d["group_size"] == 64 and d["desc_act"] is True
  assert GPTQConfig.from_dict(d) == c


def test_from_transformers_quantization_config():
  transformers = importorskip("transformers")
  hf = transformers.GPTQConfig(bits=4, group_size=32, desc_act=True, sym=False,
                               format="gptq_v2").to_dict()
  c = GPTQConfig.from_dict(hf)
  assert (c.bits, c.group_size, c.desc_act, c.act_group_aware, c.sym, c.format) == (
      4, 32, True, False, False, "gptq_v2")
  with pytest.raises(ValueError, match="quant_method='awq'"):
    GPTQConfig.from_dict({"quant_method": "awq", "bits": 4})

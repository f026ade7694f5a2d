"""Quantize / dequantize round trips, layouts, pre-quantized inputs and the state-dict pass."""

import pytest
import torch
from safetensors.torch import save_file
from wan_quant_fp8.scheme import FP8_MAX, SCALE_FLOOR, SCHEMES, is_quantized_layer
from wan_quant_fp8.tensors import (
    FP8,
    adapt_prequantized,
    dequantize_weight,
    quantize_state_dict,
    quantize_weight,
)

from wan_kernel.errors import InputError, WeightsError
from wan_kernel.lora import LoraMerge, LoraSpec

REL = 2.0**-4  # float8_e4m3fn: 3 mantissa bits, so a normal value rounds within 2^-4 of itself
SUB = 2.0**-10  # half the subnormal spacing 2^-9, in units of the scale


def _weights(out=96, inp=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[:3] *= 40  # outlier rows
    w[3:6] *= 0.002  # very quiet rows
    return w


def _bound(w, scale_per_value):
    return REL * w.abs() + SUB * scale_per_value + 1e-12


@pytest.mark.parametrize("mode", ["fp8_scaled", "fp8_fast", "fp8_t5"])
def test_scaled_round_trip_is_within_the_e4m3_rounding_bound(mode):
    scheme = SCHEMES[mode]
    w = _weights()
    q, scale = quantize_weight(w, scheme)
    assert q.dtype == FP8 and q.shape == w.shape
    assert scale.dtype == torch.float32 and tuple(scale.shape) == scheme.scale_shape(*w.shape)
    back = dequantize_weight(q, scale)
    per_value = scale.expand(
        *scale.shape[:-1], w.shape[1] // scale.shape[-2] if scale.ndim == 3 else w.shape[1]
    )
    per_value = per_value.reshape(w.shape)
    err = (back - w).abs()
    assert bool((err <= _bound(w, per_value)).all()), float((err - _bound(w, per_value)).max())
    # every block's largest value maps to +-448 exactly: the whole fp8 range is used
    assert q.float().abs().max().item() == pytest.approx(FP8_MAX, rel=REL)
    rel = ((back - w).norm() / w.norm()).item()
    assert rel < 0.03


def test_plain_fp8_round_trip_bound_and_clamping():
    w = _weights()
    w[10, 0] = 1000.0  # beyond e4m3's range
    q, scale = quantize_weight(w, SCHEMES["fp8"])
    assert scale is None and q.dtype == FP8
    back = dequantize_weight(q, None)
    assert back[10, 0].item() == FP8_MAX
    inside = w.abs() <= FP8_MAX
    err = (back - w).abs()
    assert bool((err[inside] <= _bound(w, torch.ones_like(w))[inside]).all())


def test_scaled_beats_plain_fp8_on_quiet_rows():
    w = _weights()
    plain = dequantize_weight(*quantize_weight(w, SCHEMES["fp8"]))
    scaled = dequantize_weight(*quantize_weight(w, SCHEMES["fp8_scaled"]))
    quiet = slice(3, 6)
    err_plain = ((plain - w)[quiet].norm() / w[quiet].norm()).item()
    err_scaled = ((scaled - w)[quiet].norm() / w[quiet].norm()).item()
    assert err_scaled < 0.03
    assert err_plain > 0.3


def test_block_layout_falls_back_to_per_channel_when_width_is_not_a_multiple_of_64():
    scheme = SCHEMES["fp8_scaled"]
    assert scheme.scale_shape(96, 256) == (96, 4, 1)
    assert scheme.scale_shape(96, 100) == (96, 1)
    assert SCHEMES["fp8_fast"].scale_shape(96, 256) == (96, 1)
    assert SCHEMES["fp8"].scale_shape(96, 256) is None
    w = torch.randn(8, 100)
    _, s = quantize_weight(w, scheme)
    assert s.shape == (8, 1)
    assert torch.allclose(s[:, 0], w.abs().amax(dim=1) / FP8_MAX)


def test_zero_blocks_use_the_floor_and_bad_values_are_refused():
    w = torch.zeros(4, 128)
    w[0, 70] = 1.0
    q, s = quantize_weight(w, SCHEMES["fp8_scaled"])
    assert s[1:].eq(SCALE_FLOOR).all() and s[0, 0, 0] == SCALE_FLOOR
    assert torch.equal(dequantize_weight(q, s), w)
    w[2, 3] = float("nan")
    with pytest.raises(WeightsError, match="NaN or inf"):
        quantize_weight(w, SCHEMES["fp8_scaled"], name="blocks.0.ffn.0.weight")
    with pytest.raises(WeightsError, match="2-D"):
        quantize_weight(torch.zeros(4, 4, 4), SCHEMES["fp8_scaled"])


def test_prequantized_weights_are_kept_bit_for_bit_where_scales_broadcast():
    scheme = SCHEMES["fp8_scaled"]
    w = _weights(out=32, inp=128)
    q, s = quantize_weight(w, scheme)
    # same layout: untouched
    q2, s2 = adapt_prequantized(q, s, scheme)
    assert q2 is q and torch.equal(s2, s)
    # per tensor (ComfyUI scalar) and per channel (musubi channel mode) widen to blocks exactly
    for stored in (torch.tensor(0.01), torch.tensor([0.01]), torch.rand(32, 1) + 0.5):
        q3, s3 = adapt_prequantized(q, stored, scheme)
        assert torch.equal(q3.view(torch.uint8), q.view(torch.uint8)) and s3.shape == (32, 2, 1)
        assert torch.equal(dequantize_weight(q3, s3), dequantize_weight(q, stored))
    # no scale (a plain float8_e4m3fn file): unit scales
    q4, s4 = adapt_prequantized(q, None, scheme)
    assert q4 is q and s4.eq(1).all()
    # block scales into fp8_fast's per-channel layout: quantized again, close to the original
    q5, s5 = adapt_prequantized(q, s, SCHEMES["fp8_fast"])
    assert s5.shape == (32, 1)
    assert ((dequantize_weight(q5, s5) - w).norm() / w.norm()).item() < 0.05


def test_plain_fp8_mode_refuses_scaled_files_with_a_hint():
    q, s = quantize_weight(_weights(out=16, inp=64), SCHEMES["fp8_scaled"])
    with pytest.raises(WeightsError, match="fp8_scaled"):
        adapt_prequantized(q, s, SCHEMES["fp8"], name="blocks.0.ffn.0.weight")
    q2, s2 = adapt_prequantized(q, torch.ones(1), SCHEMES["fp8"])
    assert q2 is q and s2 is None


def test_dequantize_accepts_the_scale_shapes_other_tools_write():
    q = torch.randn(8, 128).to(FP8)
    base = q.float()
    assert torch.equal(dequantize_weight(q, torch.tensor(2.0)), base * 2)
    assert torch.equal(dequantize_weight(q, torch.full((8,), 2.0)), base * 2)
    assert torch.equal(dequantize_weight(q, torch.full((8, 2), 2.0)), base * 2)
    assert dequantize_weight(q, None, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(WeightsError, match="does not fit"):
        dequantize_weight(q, torch.ones(3, 5))


def _dit_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "patch_embedding.weight": torch.randn(64, 16, 1, 2, 2, generator=g),
        "text_embedding.0.weight": torch.randn(64, 48, generator=g),
        "blocks.0.self_attn.q.weight": torch.randn(64, 64, generator=g) * 0.05,
        "blocks.0.self_attn.q.bias": torch.randn(64, generator=g),
        "blocks.0.cross_attn.k_img.weight": torch.randn(64, 64, generator=g) * 0.05,
        "blocks.0.ffn.2.weight": torch.randn(64, 128, generator=g) * 0.05,
        "blocks.0.norm3.weight": torch.randn(64, generator=g),
        "blocks.0.modulation": torch.randn(1, 6, 64, generator=g),
        "head.head.weight": torch.randn(64, 64, generator=g),
    }


def test_state_dict_pass_quantizes_only_the_block_linears():
    sd = _dit_state()
    before = {k: v.clone() for k, v in sd.items()}
    out = quantize_state_dict(sd, SCHEMES["fp8_scaled"], target="dit")
    quantized = {"blocks.0.self_attn.q", "blocks.0.cross_attn.k_img", "blocks.0.ffn.2"}
    for prefix in quantized:
        assert out[f"{prefix}.weight"].dtype == FP8
        assert out[f"{prefix}.scale_weight"].dtype == torch.float32
    assert out["blocks.0.ffn.2.scale_weight"].shape == (64, 2, 1)
    for key in (
        "patch_embedding.weight",
        "text_embedding.0.weight",
        "blocks.0.self_attn.q.bias",
        "blocks.0.norm3.weight",
        "blocks.0.modulation",
        "head.head.weight",
    ):
        assert out[key] is sd[key]
    assert set(out) == set(sd) | {f"{p}.scale_weight" for p in quantized}
    for k, v in sd.items():  # the input is not modified
        assert torch.equal(v, before[k])


def test_state_dict_pass_reads_musubi_and_comfyui_prequantized_files():
    sd = _dit_state()
    scheme = SCHEMES["fp8_scaled"]
    ours = quantize_state_dict(sd, scheme, target="dit")
    # musubi two-level: block scales divided by a per-tensor factor stored beside them
    two_level = dict(ours)
    two_level["blocks.0.ffn.2.scale_weight"] = ours["blocks.0.ffn.2.scale_weight"] / 4.0
    two_level["blocks.0.ffn.2.scale_weight_tensor"] = torch.tensor(4.0)
    # ComfyUI scaled_fp8: scalar scales, scale_input, a marker tensor, fp8 elsewhere too
    w = sd["blocks.0.self_attn.q.weight"]
    s = w.abs().max() / FP8_MAX
    two_level["blocks.0.self_attn.q.weight"] = (w / s).to(FP8)
    two_level["blocks.0.self_attn.q.scale_weight"] = s.reshape(())
    two_level["blocks.0.self_attn.q.scale_input"] = torch.tensor(1.0)
    two_level["scaled_fp8"] = torch.empty(0, dtype=FP8)
    hw = sd["head.head.weight"]
    two_level["head.head.weight"] = (hw / 0.01).to(FP8)
    two_level["head.head.scale_weight"] = torch.tensor(0.01)
    out = quantize_state_dict(two_level, scheme, target="dit")
    assert set(out) == set(ours)
    assert torch.equal(
        out["blocks.0.ffn.2.weight"].view(torch.uint8), ours["blocks.0.ffn.2.weight"].view(torch.uint8)
    )
    assert torch.allclose(out["blocks.0.ffn.2.scale_weight"], ours["blocks.0.ffn.2.scale_weight"], rtol=1e-6)
    assert out["blocks.0.self_attn.q.scale_weight"].shape == (64, 1, 1)
    assert torch.equal(
        out["blocks.0.self_attn.q.weight"].view(torch.uint8),
        two_level["blocks.0.self_attn.q.weight"].view(torch.uint8),
    )
    assert out["head.head.weight"].dtype == torch.float32  # outside the quantized set: dequantized
    assert torch.allclose(out["head.head.weight"], hw, rtol=REL, atol=0.01 * SUB)


def test_plain_fp8_files_pass_through_fp8_mode_unchanged():
    sd = _dit_state()
    stored = quantize_state_dict(sd, SCHEMES["fp8"], target="dit")
    assert "blocks.0.ffn.2.scale_weight" not in stored
    again = quantize_state_dict(stored, SCHEMES["fp8"], target="dit")
    for k in stored:
        assert torch.equal(again[k].float(), stored[k].float())


def test_t5_rule_names_the_encoder_linears_only():
    yes = [
        "encoder.block.0.layer.0.SelfAttention.q",
        "encoder.block.23.layer.0.SelfAttention.o",
        "encoder.block.1.layer.1.DenseReluDense.wi_0",
        "encoder.block.1.layer.1.DenseReluDense.wo",
    ]
    no = [
        "shared",
        "encoder.embed_tokens",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
        "encoder.block.0.layer.0.layer_norm",
        "encoder.final_layer_norm",
    ]
    assert all(is_quantized_layer("t5", n) for n in yes)
    assert not any(is_quantized_layer("t5", n) for n in no)
    assert not is_quantized_layer("dit", "head.head") and not is_quantized_layer("dit", "img_emb.proj.1")
    assert is_quantized_layer("dit", "blocks.29.cross_attn.v_img")


def _lora_file(path, name, up, down):
    """A kohya-layout LoRA file changing ``name`` by ``up @ down`` (alpha = rank: scale 1)."""
    stem = "lora_unet_" + name.replace(".", "_")
    tensors = {
        f"{stem}.lora_up.weight": up.contiguous(),
        f"{stem}.lora_down.weight": down.contiguous(),
        f"{stem}.alpha": torch.tensor(float(down.shape[0])),
    }
    save_file(tensors, str(path))
    return path


def test_lora_merge_before_quantize_adds_deltas_in_high_precision(tmp_path):
    """LoRAs reach fp8 through the kernel's one route: load_dit(state_dict_transform=LoraMerge(...))."""
    sd = _dit_state()
    g = torch.Generator().manual_seed(3)
    up, down = torch.randn(64, 4, generator=g) * 0.1, torch.randn(4, 128, generator=g) * 0.1
    delta = up @ down
    lora = _lora_file(tmp_path / "l.safetensors", "blocks.0.ffn.2", up, down)
    merged = LoraMerge([LoraSpec(lora, 0.5)])(dict(sd))
    torch.testing.assert_close(
        merged["blocks.0.ffn.2.weight"], sd["blocks.0.ffn.2.weight"] + 0.5 * delta, rtol=1e-6, atol=1e-7
    )
    # on a pre-quantized state dict the weight is dequantized first and its scale dropped
    stored = quantize_state_dict(sd, SCHEMES["fp8_scaled"], target="dit")
    merged = LoraMerge([lora])(dict(stored))
    assert "blocks.0.ffn.2.scale_weight" not in merged
    assert merged["blocks.0.ffn.2.weight"].dtype == torch.bfloat16
    expected = (
        dequantize_weight(stored["blocks.0.ffn.2.weight"], stored["blocks.0.ffn.2.scale_weight"]) + delta
    )
    assert torch.allclose(merged["blocks.0.ffn.2.weight"].float(), expected, rtol=2**-8, atol=1e-6)
    requantized = quantize_state_dict(merged, SCHEMES["fp8_scaled"], target="dit")
    assert requantized["blocks.0.ffn.2.weight"].dtype == FP8
    elsewhere = _lora_file(tmp_path / "e.safetensors", "blocks.9.ffn.2", up, down)
    with pytest.raises(InputError, match="another model"):
        LoraMerge([elsewhere])(dict(sd))
    transposed = _lora_file(tmp_path / "t.safetensors", "blocks.0.ffn.2", down.t(), up.t())
    with pytest.raises(InputError, match="does not fit"):
        LoraMerge([transposed])(dict(sd))
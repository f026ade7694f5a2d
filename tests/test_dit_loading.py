"""``load_dit``: every key layout, file form and dtype, the quantizer seam, and its error messages."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from wan_kernel import hookimpl
from wan_kernel.errors import InputError, PluginError, WeightsError
from wan_kernel.interfaces import AttentionBackend, Availability, Quantizer
from wan_kernel.models.attention import sdpa_attention
from wan_kernel.models.dit import WanDiT
from wan_kernel.models.dit_config import DiTConfig
from wan_kernel.models.dit_keys import detect_layout, dit_state_dict_from, dit_state_dict_to
from wan_kernel.models.dit_loading import load_dit
from wan_kernel.plugins import PluginManager
from wan_kernel.pipelines.plugin_setup import resolve_plugin, resolve_quantizer
from wan_kernel.testing import REFERENCE_FIXTURES, plugin_or_skip, read_reference_case

FIXTURES = REFERENCE_FIXTURES
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"reference fixtures not found at {FIXTURES}")

T2V = FIXTURES / "dit_t2v"
I2V = FIXTURES / "dit_i2v"
BF16_RMS_REL = 0.012  # the bound documented in tests/test_dit.py


def case(folder: Path) -> tuple[dict, dict]:
    return read_reference_case(folder)


def run(model: WanDiT, tensors: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(
            tensors["x"],
            tensors["t"],
            list(tensors["context"]),
            clip_fea=tensors.get("clip_fea"),
            y=tensors.get("y"),
        )


def assert_matches_case(model: WanDiT, folder: Path) -> None:
    meta, tensors = case(folder)
    tol = meta["tolerance"]["per_output"]["out"]
    out = run(model, tensors)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, tensors["out"], atol=tol["atol"], rtol=tol["rtol"])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "weights.safetensors")


# --------------------------------------------------------------------------------------------
# layouts and file forms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", [T2V, I2V], ids=["t2v", "i2v"])
def test_official_file_with_config_beside(folder):
    model = load_dit(folder / "weights.safetensors")  # heads from config.json, attention "sdpa" plugin
    assert model.config.num_heads == 2
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_matches_case(model, folder)


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_comfyui_prefixed(tmp_path, prefix):
    sd = {prefix + k: v for k, v in weights(I2V).items()}
    assert detect_layout(sd) == "comfyui"
    save_file(sd, tmp_path / "wan2.1_i2v.safetensors")
    model = load_dit(tmp_path / "wan2.1_i2v.safetensors", num_heads=2, attention=sdpa_attention)
    assert_matches_case(model, I2V)


@pytest.mark.parametrize("folder", [T2V, I2V], ids=["t2v", "i2v"])
def test_diffusers_layout_with_diffusers_config(tmp_path, folder):
    sd = dit_state_dict_to("diffusers", weights(folder))
    assert detect_layout(sd) == "diffusers" and "blocks.0.attn1.to_q.weight" in sd
    target = tmp_path / "transformer"
    target.mkdir()
    save_file(sd, target / "diffusion_pytorch_model.safetensors")
    (target / "config.json").write_text(
        json.dumps(
            {"_class_name": "WanTransformer3DModel", "num_attention_heads": 2, "attention_head_dim": 32}
        )
    )
    model = load_dit(target)
    assert model.config.num_heads == 2
    assert_matches_case(model, folder)


def test_diffusers_fused_projections(tmp_path):
    sd = dit_state_dict_to("diffusers", weights(I2V))
    for i in range(2):
        p = f"blocks.{i}."
        for part in ("weight", "bias"):
            sd[f"{p}attn1.to_qkv.{part}"] = torch.cat([sd.pop(f"{p}attn1.to_{n}.{part}") for n in "qkv"])
            sd[f"{p}attn2.to_kv.{part}"] = torch.cat([sd.pop(f"{p}attn2.to_{n}.{part}") for n in "kv"])
            sd[f"{p}attn2.to_added_kv.{part}"] = torch.cat(
                [sd.pop(f"{p}attn2.add_{n}_proj.{part}") for n in "kv"]
            )
    save_file(sd, tmp_path / "fused.safetensors")
    assert_matches_case(load_dit(tmp_path / "fused.safetensors", num_heads=2), I2V)


@pytest.mark.parametrize("with_index", [True, False])
def test_sharded_folder(tmp_path, with_index):
    sd = weights(T2V)
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, tmp_path / name)
    if with_index:
        weight_map = {k: name for name, part in shards.items() for k in part}
        (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"weight_map": weight_map})
        )
    shutil.copy(T2V / "config.json", tmp_path / "config.json")
    assert_matches_case(load_dit(tmp_path), T2V)


def test_pth_file(tmp_path):
    torch.save(weights(T2V), tmp_path / "dit.pth")
    assert_matches_case(load_dit(tmp_path / "dit.pth", num_heads=2), T2V)


def test_layout_converters_round_trip():
    sd = weights(I2V)
    for layout in ("official", "comfyui", "diffusers"):
        there = dit_state_dict_to(layout, sd)
        assert detect_layout(there) == layout
        back = dit_state_dict_from(layout, there)
        assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)
    with pytest.raises(InputError, match="unknown DiT key layout"):
        dit_state_dict_to("kohya", sd)


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_files_load_in_their_dtype(tmp_path, file_dtype):
    save_file({k: v.to(file_dtype) for k, v in weights(T2V).items()}, tmp_path / "dit.safetensors")
    model = load_dit(tmp_path / "dit.safetensors", num_heads=2)
    assert model.compute_dtype == file_dtype
    assert model.blocks[0].ffn[0].weight.dtype == file_dtype
    assert model.blocks[0].modulation.dtype == torch.float32 and model.head.modulation.dtype == torch.float32
    _, tensors = case(T2V)
    out, expected = run(model, tensors), tensors["out"]
    assert (out - expected).pow(2).mean().sqrt() < BF16_RMS_REL * expected.pow(2).mean().sqrt()


def test_dtype_argument_casts_per_tensor():
    model = load_dit(T2V / "weights.safetensors", dtype="bf16")
    assert model.patch_embedding.weight.dtype == torch.bfloat16
    assert model.blocks[1].modulation.dtype == torch.float32
    assert model.blocks[1].modulation.equal(weights(T2V)["blocks.1.modulation"])  # kept exact
    with pytest.raises(InputError, match="unknown dtype"):
        load_dit(T2V / "weights.safetensors", dtype="int4")


def test_fp8_file_without_quantizer_upcasts(tmp_path):
    sd = weights(T2V)
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}
    save_file(fp8, tmp_path / "dit_fp8.safetensors")
    model = load_dit(tmp_path / "dit_fp8.safetensors", num_heads=2)
    assert model.compute_dtype == torch.bfloat16
    loaded = model.state_dict()
    for k, v in fp8.items():
        assert torch.equal(loaded[k].float(), v.float()), k  # e4m3 values are exact in bf16 / fp32
    _, tensors = case(T2V)
    assert torch.isfinite(run(model, tensors)).all()
    assert (
        load_dit(tmp_path / "dit_fp8.safetensors", num_heads=2, dtype=torch.float16).compute_dtype
        == torch.float16
    )


FP8_MAX = 448.0


def quantize_fp8(w: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` of a 2-D weight in one of the stored scaled-fp8 layouts (plain torch)."""
    out_f, in_f = w.shape
    if layout in ("block16", "block16_flat"):  # [out, in/16, 1] (musubi) or [out, in/16]
        grouped = w.view(out_f, in_f // 16, 16)  # [out, nb, 16]
        scale = grouped.abs().amax(dim=2, keepdim=True) / FP8_MAX  # [out, nb, 1]
        q = (grouped / scale).to(torch.float8_e4m3fn).view(out_f, in_f)
        return q, scale if layout == "block16" else scale[..., 0]
    if layout == "channel":  # [out, 1]
        scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
    elif layout == "tensor":  # [1]
        scale = (w.abs().max() / FP8_MAX).reshape(1)
    elif layout == "scalar":  # [] (ComfyUI)
        scale = w.abs().max() / FP8_MAX
    else:
        raise ValueError(layout)
    return (w / scale).to(torch.float8_e4m3fn), scale


def scaled_fp8_file(tmp_path: Path, layout: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """The T2V fixture with every block Linear stored as scaled fp8 in ``layout``."""
    stored: dict[str, torch.Tensor] = {}
    for k, v in weights(T2V).items():
        if not (k.startswith("blocks.") and k.endswith(".weight") and v.ndim == 2):
            stored[k] = v
            continue
        prefix = k[: -len(".weight")]
        if layout == "two_level":  # musubi: block scales relative to one tensor scale
            q, block = quantize_fp8(v, "block16")
            tensor = block.max()
            stored[k], stored[prefix + ".scale_weight"] = q, block / tensor
            stored[prefix + ".scale_weight_tensor"] = tensor.reshape(1)
        elif layout == "comfyui":
            stored[k], stored[prefix + ".scale_weight"] = quantize_fp8(v, "scalar")
            stored[prefix + ".scale_input"] = torch.ones(())
        else:
            stored[k], stored[prefix + ".scale_weight"] = quantize_fp8(v, layout)
    if layout == "comfyui":
        stored["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    save_file(stored, tmp_path / "dit_scaled.safetensors")
    return tmp_path / "dit_scaled.safetensors", stored


def expected_weight(stored: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """The dequantized weight, by hand: ``[out, in]`` viewed as ``[out, nb, block]`` for block scales."""
    q = stored[prefix + ".weight"].float()
    scale = stored[prefix + ".scale_weight"].float()
    if prefix + ".scale_weight_tensor" in stored:
        scale = scale * stored[prefix + ".scale_weight_tensor"].float()
    if scale.numel() in (1, q.shape[0]):
        return q * scale.reshape(-1, 1) if scale.numel() > 1 else q * scale.reshape(())
    out_f, in_f = q.shape
    nb = scale.numel() // out_f
    return (q.view(out_f, nb, in_f // nb) * scale.reshape(out_f, nb, 1)).view(out_f, in_f)


@pytest.mark.parametrize(
    "layout", ["block16", "block16_flat", "channel", "tensor", "scalar", "two_level", "comfyui"]
)
def test_scaled_fp8_file_is_dequantized(tmp_path, layout):
    path, stored = scaled_fp8_file(tmp_path, layout)
    model = load_dit(path, num_heads=2, dtype=torch.float32)
    loaded = model.state_dict()
    assert not any("scale" in k for k in loaded)
    for prefix in ("blocks.0.self_attn.q", "blocks.1.ffn.0", "blocks.1.ffn.2", "blocks.0.cross_attn.o"):
        assert torch.equal(loaded[prefix + ".weight"], expected_weight(stored, prefix)), prefix
    original = weights(T2V)["blocks.1.ffn.2.weight"]  # [64, 128]: the layout must not be mixed up
    assert (loaded["blocks.1.ffn.2.weight"] - original).abs().max() < 0.07 * original.abs().max()
    _, tensors = case(T2V)
    out = run(model, tensors)
    assert (out - tensors["out"]).abs().max() < 0.1 * tensors["out"].abs().max()
    bf16 = load_dit(path, num_heads=2)  # the default for fp8 files: bfloat16 compute
    assert bf16.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert bf16.blocks[0].modulation.dtype == torch.float32


def test_scaled_fp8_scale_of_wrong_shape(tmp_path):
    sd = weights(T2V)
    sd["blocks.0.self_attn.q.weight"] = sd["blocks.0.self_attn.q.weight"].to(torch.float8_e4m3fn)
    sd["blocks.0.self_attn.q.scale_weight"] = torch.ones(64, 3, 1)  # 64 inputs are no 3 equal blocks
    with pytest.raises(
        WeightsError, match=r"blocks\.0\.self_attn\.q\.weight: its scale_weight of shape \[64, 3, 1\]"
    ):
        load_dit(_save(tmp_path, sd), num_heads=2)


# --------------------------------------------------------------------------------------------
# the quantizer seam
# --------------------------------------------------------------------------------------------


class Int8Linear(nn.Module):
    """A toy weight-only int8 linear: ``weight`` int8, per-row ``scale`` float32."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        out_f, in_f = linear.weight.shape
        device = linear.weight.device
        self.register_buffer("weight", torch.empty(out_f, in_f, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_f, 1, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(
            torch.empty(out_f, dtype=linear.bias.dtype, device=device), requires_grad=False
        )

    def forward(self, x):
        return F.linear(x, (self.weight.float() * self.scale).to(x.dtype), self.bias.to(x.dtype))


class FakeInt8(Quantizer):
    name = "fake_int8"
    supported_targets = ("dit",)

    def __init__(self):
        self.calls: list[tuple] = []

    def convert_for_runtime(self, model, *, target):
        self.calls.append(("convert", target, model.patch_embedding.weight.device.type, model.compute_dtype))
        for block in model.blocks:
            block.ffn[0] = Int8Linear(block.ffn[0])
            block.ffn[2] = Int8Linear(block.ffn[2])
        return model

    def quantize_state_dict(self, state_dict, *, target, device="cpu"):
        self.calls.append(("quantize", target, str(device)))
        for key in [k for k in state_dict if ".ffn." in k and k.endswith(".weight")]:
            w = state_dict[key].float()
            scale = w.abs().amax(dim=1, keepdim=True) / 127
            state_dict[key] = torch.round(w / scale).to(torch.int8)
            state_dict[key[: -len("weight")] + "scale"] = scale
        return state_dict


class KernelSdpa(AttentionBackend):
    """The kernel's default attention registered as a plugin would be (named ``sdpa``)."""

    name = "sdpa"

    def availability(self) -> Availability:
        return Availability.yes()

    def __call__(self, q, k, v, k_lens=None):
        return sdpa_attention(q, k, v, k_lens)


def test_quantizer_by_name_through_plugins():
    quantizer = FakeInt8()
    module = types.ModuleType("fake_quant_plugin")

    @hookimpl
    def wan_register_quantization(register):
        register(quantizer)

    @hookimpl
    def wan_register_attention(register):
        register(KernelSdpa())

    module.wan_register_quantization = wan_register_quantization
    module.wan_register_attention = wan_register_attention
    pm = PluginManager(load_entry_points=False, extra_plugins=[("fake", module)], environ={})
    model = load_dit(
        T2V / "weights.safetensors",
        quant=resolve_quantizer("fake_int8", target="dit", manager=pm),
        attention=resolve_plugin("attention", "sdpa", manager=pm),
    )
    assert quantizer.calls == [("convert", "dit", "meta", torch.float32), ("quantize", "dit", "cpu")]
    ffn = model.blocks[1].ffn[2]
    assert isinstance(ffn, Int8Linear) and ffn.weight.dtype == torch.int8 and ffn.scale.dtype == torch.float32
    _, tensors = case(T2V)
    out, expected = run(model, tensors), tensors["out"]
    err = (out - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()
    assert 1e-5 < err < 0.05  # quantized, and still the same model


def test_quantizer_object_and_wrong_target():
    quantizer = FakeInt8()
    model = load_dit(T2V / "weights.safetensors", quant=quantizer, dtype="bf16", attention=sdpa_attention)
    assert quantizer.calls[0] == ("convert", "dit", "meta", torch.bfloat16)
    assert model.blocks[0].ffn[0].bias.dtype == torch.bfloat16
    t5_only = FakeInt8()
    t5_only.supported_targets = ("t5",)
    with pytest.raises(PluginError, match="does not support the DiT"):
        load_dit(T2V / "weights.safetensors", quant=t5_only)
    with pytest.raises(InputError, match="quant must be"):
        load_dit(T2V / "weights.safetensors", quant=42)


# --------------------------------------------------------------------------------------------
# LoRAs merged while loading
# --------------------------------------------------------------------------------------------

LORA_TARGETS = {"blocks.0.self_attn.q": (64, 64), "blocks.1.ffn.0": (128, 64), "blocks.1.ffn.2": (64, 128)}


def lora_file(tmp_path: Path) -> Path:
    """A kohya-layout LoRA (rank 4, alpha 2) on three Linears of the tiny DiT."""
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for name, (out_f, in_f) in LORA_TARGETS.items():
        kohya = "lora_unet_" + name.replace(".", "_")
        sd[kohya + ".lora_down.weight"] = torch.randn(4, in_f, generator=gen) * 0.1
        sd[kohya + ".lora_up.weight"] = torch.randn(out_f, 4, generator=gen) * 0.1
        sd[kohya + ".alpha"] = torch.tensor(2.0)
    save_file(sd, tmp_path / "lora.safetensors")
    return tmp_path / "lora.safetensors"


def test_loras_without_quant_equal_apply_loras(tmp_path):
    from wan_kernel.lora import LoraMerge, LoraSpec, apply_loras

    specs = [LoraSpec(lora_file(tmp_path), multiplier=0.7)]
    lines: list[str] = []
    merge = LoraMerge(specs, log=lines.append)
    merged = load_dit(T2V / "weights.safetensors", state_dict_transform=merge).state_dict()
    by_hand = apply_loras(load_dit(T2V / "weights.safetensors"), specs).state_dict()
    assert merged.keys() == by_hand.keys()
    for key in merged:
        assert torch.equal(merged[key], by_hand[key]), key
    plain = weights(T2V)["blocks.1.ffn.2.weight"]
    assert not torch.equal(merged["blocks.1.ffn.2.weight"], plain)
    assert len(lines) == 1 and "merged into 3 module(s)" in lines[0]


class RecordingQuantizer(FakeInt8):
    """The toy int8 quantizer, keeping a copy of what it was asked to quantize."""

    def quantize_state_dict(self, state_dict, *, target, device="cpu"):
        self.seen = {k: v.clone() for k, v in state_dict.items()}
        return super().quantize_state_dict(state_dict, target=target, device=device)


def test_loras_are_merged_before_the_quantizer_sees_the_weights(tmp_path):
    from wan_kernel.lora import LoraMerge, LoraSpec

    specs = [LoraSpec(lora_file(tmp_path), multiplier=-0.5)]
    quantizer = RecordingQuantizer()
    load_dit(T2V / "weights.safetensors", state_dict_transform=LoraMerge(specs), quant=quantizer)
    by_hand = LoraMerge(specs)(weights(T2V))
    assert quantizer.seen.keys() == by_hand.keys()
    for key in by_hand:
        assert torch.equal(quantizer.seen[key], by_hand[key]), key


def test_loras_with_fp8_scaled_equal_merging_then_quantizing(tmp_path):
    from wan_kernel.lora import LoraMerge, LoraSpec

    specs = [LoraSpec(lora_file(tmp_path))]
    fp8_scaled = plugin_or_skip("quantization", "fp8_scaled")
    model = load_dit(T2V / "weights.safetensors", state_dict_transform=LoraMerge(specs), quant=fp8_scaled)
    merged = LoraMerge(specs)(weights(T2V))
    by_hand = load_dit(_save(tmp_path, merged), num_heads=2, quant=fp8_scaled).state_dict()
    loaded = model.state_dict()
    assert loaded["blocks.1.ffn.2.weight"].dtype == torch.float8_e4m3fn
    assert loaded.keys() == by_hand.keys()
    for key in loaded:
        assert torch.equal(loaded[key].float(), by_hand[key].float()), key
    without = load_dit(T2V / "weights.safetensors", quant=resolve_quantizer("fp8_scaled", target="dit")).state_dict()
    assert not torch.equal(loaded["blocks.1.ffn.2.weight"].float(), without["blocks.1.ffn.2.weight"].float())
    assert torch.equal(
        loaded["blocks.0.self_attn.k.weight"].float(), without["blocks.0.self_attn.k.weight"].float()
    )


def block_scaled_file(tmp_path: Path, layout: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """A pre-quantized DiT file: the ``fp8_scaled`` quantizer's stored tensors (ffn.2: [64, 2, 1]) or a
    hand-made one."""
    if layout != "fp8_scaled":
        return scaled_fp8_file(tmp_path, layout)
    fp8_scaled = plugin_or_skip("quantization", "fp8_scaled")
    path = tmp_path / "dit_fp8_scaled.safetensors"
    save_file(fp8_scaled.quantize_state_dict(weights(T2V), target="dit"), path)
    return path, load_file(path)


@pytest.mark.parametrize("layout", ["fp8_scaled", "two_level", "block16_flat"])
def test_loras_into_a_block_scaled_fp8_file(tmp_path, layout):
    """LoRA + a pre-quantized block-scaled file, with and without quant, equals merging by hand.

    With ``quant``: a layer the LoRA touches is dequantized in float32 (every block layout, the
    two-level factor multiplied in), merged, rounded to bfloat16 and quantized once; every other
    layer is what loading the file with the quantizer and no LoRA gives (for the plugin's own
    files: the stored fp8 values and scales, untouched).
    """
    fp8_scaled = plugin_or_skip("quantization", "fp8_scaled")
    from wan_kernel.lora import LoraMerge, LoraSpec, apply_loras, read_lora

    path, stored = block_scaled_file(tmp_path, layout)
    assert stored["blocks.1.ffn.2.scale_weight"].numel() > 64  # block scales: several per row
    specs = [LoraSpec(lora_file(tmp_path), multiplier=0.8)]
    lora = read_lora(specs[0].path)

    # without quant: the same as merging into the dequantized float32 model
    merged = load_dit(
        path, num_heads=2, dtype=torch.float32, state_dict_transform=LoraMerge(specs)
    ).state_dict()
    by_hand = apply_loras(load_dit(path, num_heads=2, dtype=torch.float32), specs).state_dict()
    assert merged.keys() == by_hand.keys()
    for key in merged:
        assert torch.equal(merged[key], by_hand[key]), key

    # with quant: each merged layer quantized once from the float32 merge (by hand) ...
    merge = LoraMerge(specs)
    loaded = load_dit(
        path, num_heads=2, dtype=torch.float32, quant=resolve_quantizer("fp8_scaled", target="dit"), state_dict_transform=merge
    ).state_dict()
    assert len(merge.reports) == 1 and len(merge.reports[0].merged) == len(LORA_TARGETS)
    for name, shape in LORA_TARGETS.items():
        delta = lora.modules["lora_unet_" + name.replace(".", "_")].weight_delta(shape)
        w = torch.add(expected_weight(stored, name), delta, alpha=0.8).to(torch.bfloat16)
        quantized = fp8_scaled.quantize_state_dict({name + ".weight": w}, target="dit")
        q, scale = quantized[name + ".weight"], quantized[name + ".scale_weight"]
        assert torch.equal(loaded[name + ".weight"].float(), q.float()), name
        assert torch.equal(loaded[name + ".scale_weight"], scale), name
    # ... every other tensor as loading the file with the quantizer and no LoRA gives it ...
    without = load_dit(path, num_heads=2, dtype=torch.float32, quant=resolve_quantizer("fp8_scaled", target="dit")).state_dict()
    assert loaded.keys() == without.keys()
    untouched = [k for k in loaded if k.rsplit(".", 1)[0] not in LORA_TARGETS]
    for key in untouched:
        assert torch.equal(loaded[key].float(), without[key].float()), key
    if layout == "fp8_scaled":  # ... which, for a file in the quantizer's own layout, is the file
        for key in untouched:
            if key in stored and stored[key].dtype == torch.float8_e4m3fn:
                scale_key = key[: -len("weight")] + "scale_weight"
                assert torch.equal(loaded[key].float(), stored[key].float()), key
                assert torch.equal(loaded[scale_key], stored[scale_key]), scale_key

    # and the fp8 model with the LoRA computes what the dequantized one with the LoRA does, to fp8 rounding
    _, tensors = case(T2V)
    plain = load_dit(path, num_heads=2, dtype=torch.float32, state_dict_transform=LoraMerge(specs))
    fp8 = load_dit(
        path, num_heads=2, dtype=torch.float32, quant=resolve_quantizer("fp8_scaled", target="dit"), state_dict_transform=LoraMerge(specs)
    )
    want, got = run(plain, tensors), run(fp8, tensors)
    assert (got - want).pow(2).mean().sqrt() < 0.05 * want.pow(2).mean().sqrt()


def test_bad_lora_spec_is_refused_before_loading(tmp_path):
    from wan_kernel.lora import LoraMerge

    with pytest.raises(InputError, match="a LoRA is given as a path or a LoraSpec"):
        LoraMerge([42])
    with pytest.raises(WeightsError, match="not found"):
        missing = LoraMerge([tmp_path / "missing.safetensors"])
        load_dit(T2V / "weights.safetensors", state_dict_transform=missing)


# --------------------------------------------------------------------------------------------
# heads
# --------------------------------------------------------------------------------------------


def test_num_heads_resolution_order(tmp_path):
    cfg = DiTConfig(dim=256, ffn_dim=32, num_heads=2, num_layers=1, text_dim=16)
    save_file(WanDiT(cfg, attention=sdpa_attention).state_dict(), tmp_path / "dit.safetensors")
    path = tmp_path / "dit.safetensors"
    assert load_dit(path).config.num_heads == 2  # dim // 128
    (tmp_path / "config.json").write_text(json.dumps({"dim": 256, "num_heads": 4, "model_type": "t2v"}))
    assert load_dit(path).config.num_heads == 4  # config.json beside
    assert load_dit(path, num_heads=8).config.num_heads == 8  # keyword wins
    (tmp_path / "config.json").write_text(json.dumps({"dim": 5120, "num_heads": 40}))
    assert load_dit(path).config.num_heads == 2  # a config.json for another model is ignored
    with pytest.raises(WeightsError, match="num_heads=3"):
        load_dit(path, num_heads=3)


# --------------------------------------------------------------------------------------------
# reading the config without loading
# --------------------------------------------------------------------------------------------


def test_read_dit_config_every_layout(tmp_path):
    from wan_kernel.models.dit_loading import read_dit_config

    config, layout = read_dit_config(I2V / "weights.safetensors")  # heads from config.json beside
    assert layout == "official" and config == load_dit(I2V / "weights.safetensors").config
    assert (config.model_type, config.dim, config.num_heads, config.num_layers) == ("i2v", 64, 2, 2)
    sd = weights(I2V)
    for target in ("comfyui", "diffusers"):
        save_file(dit_state_dict_to(target, sd), tmp_path / f"{target}.safetensors")
        assert read_dit_config(tmp_path / f"{target}.safetensors", num_heads=2) == (config, target)
    torch.save(weights(T2V), tmp_path / "dit.pth")
    t2v, layout = read_dit_config(tmp_path / "dit.pth", num_heads=4)
    assert layout == "official" and t2v.model_type == "t2v" and t2v.num_heads == 4


def test_read_dit_config_errors(tmp_path):
    from wan_kernel.models.dit_loading import read_dit_config

    with pytest.raises(WeightsError, match="looks like a Wan VAE, not a Wan2.1 DiT"):
        read_dit_config(FIXTURES / "vae" / "weights.safetensors")
    with pytest.raises(WeightsError, match="not found"):
        read_dit_config(tmp_path / "nope.safetensors")
    with pytest.raises(WeightsError, match="num_heads=3"):
        read_dit_config(T2V / "weights.safetensors", num_heads=3)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_dit(tmp_path / "nope.safetensors")


@pytest.mark.parametrize(
    ("folder", "kind"), [("vae", "a Wan VAE"), ("t5", "a T5 text encoder"), ("clip_visual", "a CLIP model")]
)
def test_other_models_are_refused(folder, kind):
    with pytest.raises(WeightsError, match=f"looks like {kind}, not a Wan2.1 DiT"):
        load_dit(FIXTURES / folder / "weights.safetensors")


def test_lora_is_refused(tmp_path):
    lora = {
        "diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 64),
        "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(64, 4),
    }
    save_file(lora, tmp_path / "lora.safetensors")
    with pytest.raises(WeightsError, match="looks like a LoRA file"):
        load_dit(tmp_path / "lora.safetensors")


def _save(tmp_path: Path, sd: dict) -> Path:
    save_file(sd, tmp_path / "dit.safetensors")
    return tmp_path / "dit.safetensors"


def test_missing_keys(tmp_path):
    sd = weights(T2V)
    del sd["blocks.1.ffn.2.bias"], sd["head.modulation"]
    with pytest.raises(WeightsError, match=r"lacks 2 tensor\(s\).*blocks\.1\.ffn\.2\.bias, head\.modulation"):
        load_dit(_save(tmp_path, sd), num_heads=2)


def test_unexpected_keys(tmp_path):
    sd = weights(T2V)
    sd["blocks.0.self_attn.extra.weight"] = torch.zeros(3)
    with pytest.raises(WeightsError, match=r"does not have: blocks\.0\.self_attn\.extra\.weight"):
        load_dit(_save(tmp_path, sd), num_heads=2)


def test_shape_mismatch(tmp_path):
    sd = weights(T2V)
    sd["blocks.1.self_attn.q.weight"] = torch.zeros(64, 32)
    with pytest.raises(
        WeightsError, match=r"'blocks\.1\.self_attn\.q\.weight' has shape \[64, 32\].*needs \[64, 64\]"
    ):
        load_dit(_save(tmp_path, sd), num_heads=2)


def test_task_check():
    with pytest.raises(
        WeightsError, match="image-to-video DiT .*in_dim 36.*task t2v-14B needs a text-to-video DiT"
    ):
        load_dit(I2V / "weights.safetensors", task="t2v-14B")
    with pytest.raises(WeightsError, match="task i2v-14B needs dim 5120 with 40 layers"):
        load_dit(I2V / "weights.safetensors", task="i2v-14B")
    assert load_dit(I2V / "weights.safetensors", task="i2v").config.model_type == "i2v"
    with pytest.raises(InputError, match="unknown task"):
        load_dit(I2V / "weights.safetensors", task="v2v")


def test_unknown_attention_name():
    with pytest.raises(PluginError, match="no-such-attention"):
        resolve_plugin("attention", "no-such-attention")


def test_unknown_dit_layout(tmp_path):
    odd = {  # ComfyUI prefix around diffusers names
        "model.diffusion_model.blocks.0.attn1.to_q.weight": torch.zeros(2),
        "model.diffusion_model.condition_embedder.time_proj.weight": torch.zeros(2),
    }
    save_file(odd, tmp_path / "odd.safetensors")
    with pytest.raises(WeightsError, match="layout this loader does not know"):
        load_dit(tmp_path / "odd.safetensors")

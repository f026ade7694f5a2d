"""LoRA at inference: every file layout merges the same delta, scaling, patterns, reports and errors.

Each LoRA here is written from one random low-rank delta on the tiny official fixture DiT; the
model with the LoRA applied must match (1e-5) the model whose weights were merged by hand.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from wan_kernel import lora
from wan_kernel.errors import InputError, WeightsError
from wan_kernel.lora import LoraMerge, LoraSpec, LoraWarning
from wan_kernel.models.dit_keys import dit_state_dict_from, dit_state_dict_to, official_to_diffusers_key
from wan_kernel.models.dit_loading import load_dit
from wan_kernel.testing import REFERENCE_FIXTURES

FIXTURES = REFERENCE_FIXTURES
T2V = FIXTURES / "dit_t2v" / "weights.safetensors"
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"reference fixtures not found at {FIXTURES}")

RANK = 2
ATOL = 1e-5
# the modules the LoRA touches: every linear of both blocks, a top-level linear and the patch conv
BLOCK_LINEARS = [f"self_attn.{p}" for p in "qkvo"] + [f"cross_attn.{p}" for p in "qkvo"] + ["ffn.0", "ffn.2"]
TARGETS = [f"blocks.{i}.{m}" for i in range(2) for m in BLOCK_LINEARS]
TARGETS += ["text_embedding.0", "patch_embedding"]


@pytest.fixture(scope="module")
def base_sd() -> dict[str, torch.Tensor]:
    return load_file(T2V)


@pytest.fixture(scope="module")
def base_model():
    return load_dit(T2V, dtype=torch.float32)


@pytest.fixture()
def model(base_model):
    return copy.deepcopy(base_model)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 4, 6, generator=g)
    t = torch.tensor([700.0])
    context = [torch.randn(5, 48, generator=g)]
    return x, t, context


def forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


def random_delta(sd, targets=TARGETS, seed=1, alpha=None):
    """{module: (down, up, alpha)} with conv-shaped factors for the Conv3d, as kohya writes them."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in targets:
        w = sd[name + ".weight"]
        down_shape = (RANK, *w.shape[1:])  # [r, in] or [r, in, kt, kh, kw]
        up_shape = (w.shape[0], RANK, *([1] * (w.dim() - 2)))  # [out, r] or [out, r, 1, 1, 1]
        down = torch.randn(down_shape, generator=g) * 0.3
        up = torch.randn(up_shape, generator=g) * 0.3
        out[name] = (down, up, alpha)
    return out


def hand_merged(sd, *deltas_and_multipliers):
    """The state dict with ``W += m * alpha/r * up @ down`` applied by hand."""
    out = {k: v.clone() for k, v in sd.items()}
    for delta, multiplier in deltas_and_multipliers:
        for name, (down, up, alpha) in delta.items():
            w = out[name + ".weight"]
            scale = 1.0 if alpha is None else alpha / RANK
            product = (up.flatten(1).double() @ down.flatten(1).double()).reshape(w.shape)
            out[name + ".weight"] = (w.double() + multiplier * scale * product).float()
    return out


def model_with(base_model, sd):
    m = copy.deepcopy(base_model)
    m.load_state_dict(sd)
    return m


def write_lora(path: Path, delta, layout: str = "kohya", *, metadata=None) -> Path:
    """Write ``delta`` as a LoRA file in one of the layouts peers use."""
    tensors = {}
    for name, (down, up, alpha) in delta.items():
        if layout == "kohya":
            stem, d, u = "lora_unet_" + name.replace(".", "_"), "lora_down.weight", "lora_up.weight"
        elif layout == "wan_fun":  # double underscore, and the mixed separators some tools write
            stem, d, u = "lora_unet__" + name.replace(".", "_", 1), "lora_down.weight", "lora_up.weight"
        elif layout == "lycoris_diffusers":
            stem = "lycoris_" + official_to_diffusers_key(name).replace(".", "_")
            d, u = "lora_down.weight", "lora_up.weight"
        elif layout == "comfyui":
            stem, d, u = "diffusion_model." + name, "lora_A.weight", "lora_B.weight"
        elif layout == "comfyui_down_up":
            stem, d, u = "diffusion_model." + name, "lora_down.weight", "lora_up.weight"
        elif layout == "diffusers":
            stem, d, u = "transformer." + official_to_diffusers_key(name), "lora_A.weight", "lora_B.weight"
        elif layout == "peft":
            stem, d, u = "base_model.model." + name, "lora_A.default.weight", "lora_B.default.weight"
        else:
            raise ValueError(layout)
        if layout in ("diffusers", "peft"):  # PEFT files hold 2-D factors only
            down, up = down.flatten(1), up.flatten(1)
        tensors[f"{stem}.{d}"] = down.contiguous()
        tensors[f"{stem}.{u}"] = up.contiguous()
        if alpha is not None and layout not in ("diffusers", "peft"):
            tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path), metadata=metadata)
    return path


def weight(model, name):
    return model.get_submodule(name).weight.detach()


# --------------------------------------------------------------------------------------------
# Every layout merges the same delta
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout", ["kohya", "wan_fun", "lycoris_diffusers", "comfyui", "comfyui_down_up", "diffusers", "peft"]
)
def test_each_layout_matches_hand_merge(layout, tmp_path, base_sd, base_model, model, inputs):
    alpha = None if layout in ("diffusers", "peft") else 1.0  # PEFT files carry no alpha tensor
    delta = random_delta(base_sd, alpha=alpha)
    path = write_lora(tmp_path / "lora.safetensors", delta, layout)

    assert lora.apply_loras(model, [LoraSpec(path)]) is model
    expected = forward(model_with(base_model, hand_merged(base_sd, (delta, 1.0))), inputs)
    out = forward(model, inputs)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    # the delta is big enough that a LoRA which merged nothing (or the wrong modules) would show
    assert (out - forward(base_model, inputs)).abs().max() > 1e-2


def test_conv_lora_changes_patch_embedding(tmp_path, base_sd, model):
    delta = random_delta(base_sd, targets=["patch_embedding"])
    lora.apply_loras(model, [write_lora(tmp_path / "c.safetensors", delta)])
    expected = hand_merged(base_sd, (delta, 1.0))["patch_embedding.weight"]
    torch.testing.assert_close(weight(model, "patch_embedding"), expected, atol=1e-6, rtol=1e-6)


def test_peft_lora_alpha_from_metadata_and_adapter_config(tmp_path, base_sd, base_model):
    delta = random_delta(base_sd, targets=["blocks.0.self_attn.q"])
    with_alpha = {k: (d, u, 1.0) for k, (d, u, _) in delta.items()}
    want = hand_merged(base_sd, (with_alpha, 1.0))["blocks.0.self_attn.q.weight"]

    peft_config = {"transformer.r": RANK, "transformer.lora_alpha": 1}  # diffusers packs it with a prefix
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(peft_config)}
    path = write_lora(tmp_path / "pytorch_lora_weights.safetensors", delta, "diffusers", metadata=meta)
    m = copy.deepcopy(base_model)
    lora.apply_loras(m, [path])
    torch.testing.assert_close(weight(m, "blocks.0.self_attn.q"), want, atol=1e-6, rtol=1e-6)

    folder = tmp_path / "epoch1"  # diffusion-pipe: adapter_config.json beside the weights
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": 1}))
    path = write_lora(folder / "adapter_model.safetensors", delta, "comfyui")
    m = copy.deepcopy(base_model)
    lora.apply_loras(m, [path])
    torch.testing.assert_close(weight(m, "blocks.0.self_attn.q"), want, atol=1e-6, rtol=1e-6)


def test_diff_and_diff_b_full_deltas(tmp_path, base_sd, model):
    g = torch.Generator().manual_seed(3)
    diff = torch.randn(64, generator=g)  # the affine norm before cross-attention
    diff_b = torch.randn(64, generator=g)
    path = tmp_path / "diff.safetensors"
    tensors = {
        "diffusion_model.blocks.1.norm3.diff": diff,
        "diffusion_model.blocks.1.cross_attn.o.diff_b": diff_b,
    }
    save_file(tensors, str(path))
    lora.apply_loras(model, [LoraSpec(path, multiplier=0.5)])
    torch.testing.assert_close(weight(model, "blocks.1.norm3"), base_sd["blocks.1.norm3.weight"] + 0.5 * diff)
    bias = model.get_submodule("blocks.1.cross_attn.o").bias.detach()
    torch.testing.assert_close(bias, base_sd["blocks.1.cross_attn.o.bias"] + 0.5 * diff_b)


# --------------------------------------------------------------------------------------------
# Scaling, patterns, several LoRAs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("multiplier", [0.5, -1.0, 2.0])
def test_multiplier_scales_the_delta(multiplier, tmp_path, base_sd, model):
    delta = random_delta(base_sd, targets=["blocks.0.ffn.0", "blocks.1.cross_attn.k"], alpha=2.0)
    lora.apply_loras(model, [LoraSpec(write_lora(tmp_path / "l.safetensors", delta), multiplier=multiplier)])
    expected = hand_merged(base_sd, (delta, multiplier))
    for name in delta:
        torch.testing.assert_close(weight(model, name), expected[name + ".weight"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("alpha, scale", [(1.0, 0.5), (8.0, 4.0), (None, 1.0)])
def test_alpha_over_rank(alpha, scale, tmp_path, base_sd, model):
    delta = random_delta(base_sd, targets=["blocks.0.self_attn.v"], alpha=alpha)
    lora.apply_loras(model, [write_lora(tmp_path / "l.safetensors", delta)])
    down, up, _ = delta["blocks.0.self_attn.v"]
    want = base_sd["blocks.0.self_attn.v.weight"] + scale * (up @ down)
    torch.testing.assert_close(weight(model, "blocks.0.self_attn.v"), want, atol=1e-6, rtol=1e-6)


def changed(model, base_sd) -> set[str]:
    return {name for name in TARGETS if not torch.equal(weight(model, name), base_sd[name + ".weight"])}


@pytest.mark.parametrize(
    "include, exclude, expect",
    [
        ("self_attn", None, {n for n in TARGETS if ".self_attn." in n}),  # either spelling
        (None, "blocks_1_", {n for n in TARGETS if not n.startswith("blocks.1.")}),  # kohya spelling
        (r"blocks\.0\.", r"ffn", {n for n in TARGETS if n.startswith("blocks.0.") and ".ffn." not in n}),
        (r"^lora_unet_(patch|text)", None, {"patch_embedding", "text_embedding.0"}),
    ],
)
def test_include_exclude_patterns(include, exclude, expect, tmp_path, base_sd, model):
    path = write_lora(tmp_path / "l.safetensors", random_delta(base_sd, alpha=1.0), "comfyui")
    spec = {"path": path, "multiplier": 1.0, "include": include, "exclude": exclude}  # the pipeline's form
    lora.apply_loras(model, [spec])
    assert changed(model, base_sd) == expect


def test_patterns_that_leave_nothing_are_an_error(tmp_path, base_sd, model):
    path = write_lora(tmp_path / "l.safetensors", random_delta(base_sd))
    with pytest.raises(InputError, match="patterns leave none"):
        lora.apply_loras(model, [LoraSpec(path, include=["no_such_module"])])
    assert changed(model, base_sd) == set()


def test_invalid_pattern_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="include_patterns.*regular expression"):
        LoraSpec(tmp_path / "x.safetensors", include="blocks[")


def test_two_loras_add(tmp_path, base_sd, base_model, model, inputs):
    a = random_delta(base_sd, seed=1, alpha=1.0)
    b = random_delta(base_sd, targets=TARGETS[3:9], seed=2, alpha=4.0)
    pa = write_lora(tmp_path / "a.safetensors", a, "kohya")
    pb = write_lora(tmp_path / "b.safetensors", b, "comfyui")
    lora.apply_loras(model, [LoraSpec(pa, 0.7), LoraSpec(pb, -1.3)])
    expected_sd = hand_merged(base_sd, (a, 0.7), (b, -1.3))
    for name in TARGETS:
        torch.testing.assert_close(weight(model, name), expected_sd[name + ".weight"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        forward(model, inputs), forward(model_with(base_model, expected_sd), inputs), atol=ATOL, rtol=ATOL
    )


# --------------------------------------------------------------------------------------------
# Reports and errors
# --------------------------------------------------------------------------------------------


def test_unmatched_modules_are_reported(tmp_path, base_sd, model):
    delta = random_delta(base_sd, targets=["blocks.0.cross_attn.q"], alpha=1.0)
    g = torch.Generator().manual_seed(5)
    for i in range(2):  # an I2V LoRA on a T2V model: k_img / v_img have no target
        for m in ("k_img", "v_img"):
            down, up = torch.randn(RANK, 64, generator=g), torch.randn(64, RANK, generator=g)
            delta[f"blocks.{i}.cross_attn.{m}"] = (down, up, 1.0)
    path = write_lora(tmp_path / "i2v.safetensors", delta)
    lines = []
    with pytest.warns(LoraWarning, match=r"4 without a target.*k_img"):
        lora.apply_loras(model, [path], log=lines.append)
    assert changed(model, base_sd) == {"blocks.0.cross_attn.q"}
    assert len(lines) == 1 and "merged into 1 module" in lines[0]


def test_lora_for_another_model_is_an_input_error(tmp_path, model, base_sd):
    path = tmp_path / "hunyuan.safetensors"
    save_file(
        {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(RANK, 64),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(192, RANK),
        },
        str(path),
    )
    with pytest.raises(InputError, match="another model"):
        lora.apply_loras(model, [path])


def test_lora_of_another_size_is_an_input_error(tmp_path, model, base_sd):
    path = tmp_path / "big.safetensors"
    good = random_delta(base_sd, targets=["blocks.0.self_attn.q"])
    bad = {"blocks.0.self_attn.k": (torch.zeros(RANK, 5120), torch.zeros(5120, RANK), None)}
    write_lora(path, {**good, **bad})
    with pytest.raises(InputError, match="another model size"):
        lora.apply_loras(model, [path])
    assert changed(model, base_sd) == set()  # checked before anything is merged


def test_not_a_lora_is_a_weights_error(tmp_path, model):
    with pytest.raises(WeightsError, match="not a LoRA file.*Wan DiT"):
        lora.apply_loras(model, [T2V])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 40)
    with pytest.raises(WeightsError):
        lora.apply_loras(model, [garbage])
    with pytest.raises(WeightsError, match="not found"):
        lora.apply_loras(model, [tmp_path / "missing.safetensors"])
    half = tmp_path / "half.safetensors"
    save_file({"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(RANK, 64)}, str(half))
    with pytest.raises(WeightsError, match="no up matrix"):
        lora.apply_loras(model, [half])


def test_quantized_model_refuses_live_merge(tmp_path, base_sd, model):
    layer = model.get_submodule("blocks.0.self_attn.q")
    layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    path = write_lora(tmp_path / "l.safetensors", random_delta(base_sd))
    with pytest.raises(InputError, match="merged while loading"):
        lora.apply_loras(model, [path])


# --------------------------------------------------------------------------------------------
# The state-dict path and load-time merging
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["official", "comfyui", "diffusers"])
def test_merge_into_state_dict(layout, tmp_path, base_sd):
    delta = random_delta(base_sd, alpha=1.0)
    path = write_lora(tmp_path / "l.safetensors", delta)
    sd = dit_state_dict_to(layout, base_sd)
    untouched = {k: v.clone() for k, v in sd.items()}
    merge = LoraMerge([LoraSpec(path, 0.5)])  # on official names: a file of any layout is renamed around it
    sd = dit_state_dict_to(layout, merge(dit_state_dict_from(layout, sd)))
    assert sorted(merge.reports[0].merged) == sorted(TARGETS)
    expected = dit_state_dict_to(layout, hand_merged(base_sd, (delta, 0.5)))
    changed_keys = {k for k in sd if not torch.equal(sd[k], untouched[k])}
    assert changed_keys == {k for k in expected if not torch.equal(expected[k], untouched[k])}
    for key in changed_keys:
        torch.testing.assert_close(sd[key], expected[key], atol=1e-6, rtol=1e-6)


def fp8_with_scales(w: torch.Tensor, layout: str) -> dict[str, torch.Tensor]:
    """``{"weight": fp8, "scale_weight": ..., ...}`` of a weight ``[out, in]`` in a scaled-fp8 layout."""
    out_f, in_f = w.shape
    if layout in ("tensor", "comfyui"):
        scale = w.abs().max() / 448.0
        q = (w / scale).to(torch.float8_e4m3fn)
        parts = {"weight": q, "scale_weight": scale.reshape(1) if layout == "tensor" else scale}
        if layout == "comfyui":
            parts["scale_input"] = torch.ones(())
        return parts
    if layout == "channel":
        scale = w.abs().amax(dim=1, keepdim=True) / 448.0  # [out, 1]
        return {"weight": (w / scale).to(torch.float8_e4m3fn), "scale_weight": scale}
    grouped = w.view(out_f, in_f // 16, 16)  # [out, nb, 16]
    scale = grouped.abs().amax(dim=2, keepdim=True) / 448.0  # [out, nb, 1]
    q = (grouped / scale).to(torch.float8_e4m3fn).view(out_f, in_f)
    if layout == "block":
        return {"weight": q, "scale_weight": scale}
    if layout == "block_flat":
        return {"weight": q, "scale_weight": scale[..., 0]}  # [out, nb]
    assert layout == "two_level"  # musubi: block scales relative to one per-tensor factor
    factor = scale.max()
    return {"weight": q, "scale_weight": scale / factor, "scale_weight_tensor": factor.reshape(1)}


def dequantized_by_hand(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    q = parts["weight"].float()
    scale = parts["scale_weight"].float() * parts.get("scale_weight_tensor", torch.ones(())).float()
    if scale.numel() == 1:
        return q * scale.reshape(())
    if scale.numel() == q.shape[0]:
        return q * scale.reshape(-1, 1)
    # element [o, i] uses the scale of its block of 16 inputs: scale[o, i // 16]
    return q * scale.reshape(q.shape[0], -1).repeat_interleave(16, dim=1)


@pytest.mark.parametrize("layout", ["tensor", "comfyui", "channel", "block", "block_flat", "two_level"])
def test_merge_into_scaled_fp8_state_dict(layout, tmp_path, base_sd):
    """An fp8 weight is dequantized in float32 with any scale layout, merged, kept bf16 without scales."""
    targets = ["blocks.0.ffn.2", "blocks.1.self_attn.q"]  # [64, 128] and [64, 64]
    delta = random_delta(base_sd, targets=targets, alpha=1.0)
    path = write_lora(tmp_path / "l.safetensors", delta)
    sd = dict(base_sd)
    stored = {}
    for name in [*targets, "blocks.0.ffn.0"]:  # blocks.0.ffn.0: fp8 the LoRA does not touch
        stored[name] = fp8_with_scales(base_sd[name + ".weight"], layout)
        sd.update({f"{name}.{k}": v for k, v in stored[name].items()})
    LoraMerge([LoraSpec(path, 0.5)])(sd)
    for name in targets:
        assert not any(k.startswith(name + ".scale") for k in sd), name
        assert sd[name + ".weight"].dtype == torch.bfloat16
        down, up, alpha = delta[name]
        product = (up @ down) * (alpha / RANK)
        want = torch.add(dequantized_by_hand(stored[name]), product, alpha=0.5).to(torch.bfloat16)
        assert torch.equal(sd[name + ".weight"], want), name  # float32 merge, one bf16 rounding
        error = sd[name + ".weight"].float() - hand_merged(base_sd, (delta, 0.5))[name + ".weight"]
        assert error.abs().max() < 0.07 * base_sd[name + ".weight"].abs().max()  # fp8 + bf16 rounding only
    for key, value in stored["blocks.0.ffn.0"].items():  # left as stored
        assert sd["blocks.0.ffn.0." + key] is value, key


def test_fp8_scale_that_does_not_fit_is_refused_before_any_change(tmp_path, base_sd):
    delta = random_delta(base_sd, targets=["blocks.0.ffn.0", "blocks.1.ffn.0"], alpha=1.0)
    path = write_lora(tmp_path / "l.safetensors", delta)
    sd = dict(base_sd)
    sd["blocks.1.ffn.0.weight"] = base_sd["blocks.1.ffn.0.weight"].to(torch.float8_e4m3fn)  # [128, 64]
    sd["blocks.1.ffn.0.scale_weight"] = torch.ones(128, 3, 1)  # 64 inputs are no 3 equal blocks
    before = dict(sd)
    with pytest.raises(WeightsError, match=r"ffn\.0\.weight: its scale_weight of shape \[128, 3, 1\]"):
        LoraMerge([path])(sd)
    assert sd.keys() == before.keys() and all(sd[k] is before[k] for k in sd)


class RecordingQuantizer:
    """A stand-in quantizer: keeps what it was given, quantizes nothing."""

    name = "recording"

    def __init__(self):
        self.seen = {}

    def convert_for_runtime(self, model, *, target):
        return model

    def quantize_state_dict(self, state_dict, *, target, device="cpu"):
        self.seen = {k: v.clone() for k, v in state_dict.items()}
        return state_dict


def test_load_time_merge_happens_before_quantization(tmp_path, base_sd, base_model, inputs):
    delta = random_delta(base_sd, alpha=1.0)
    path = write_lora(tmp_path / "l.safetensors", delta, "diffusers")
    quantizer = RecordingQuantizer()
    lines = []
    spec = LoraSpec(path, 0.8)
    merge = LoraMerge([spec], log=lines.append)
    model = load_dit(T2V, quant=quantizer, dtype=torch.float32, state_dict_transform=merge)
    expected = hand_merged(base_sd, ({k: (d, u, None) for k, (d, u, _) in delta.items()}, 0.8))
    seen = quantizer.seen["blocks.1.ffn.0.weight"]
    torch.testing.assert_close(seen, expected["blocks.1.ffn.0.weight"], atol=1e-6, rtol=1e-6)
    reference = forward(model_with(base_model, expected), inputs)
    torch.testing.assert_close(forward(model, inputs), reference, atol=ATOL, rtol=ATOL)
    assert "merged into 22 module" in lines[0]

    plain = load_dit(T2V, dtype=torch.float32, state_dict_transform=LoraMerge([spec]))  # no quantizer
    torch.testing.assert_close(forward(plain, inputs), forward(model, inputs), atol=ATOL, rtol=ATOL)

"""DoRA, LoHa, LoKr, the ComfyUI spellings and unmatched tensors, each against a merge written out by hand.

The hand merges follow the published formulas (DoRA: Liu et al. 2024 as PEFT implements it;
LoHa/LoKr: LyCORIS and musubi-tuner's networks/loha.py, networks/lokr.py), not our code.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from wan_kernel.errors import InputError
from wan_kernel.lora import LoraMerge, LoraSpec, LoraWarning, read_lora
from wan_kernel.testing import REFERENCE_FIXTURES

FIXTURES = REFERENCE_FIXTURES
T2V = FIXTURES / "dit_t2v" / "weights.safetensors"
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"reference fixtures not found at {FIXTURES}")

Q = "blocks.0.self_attn.q"  # [64, 64]
FFN = "blocks.1.ffn.0"  # [128, 64]
KQ = "lora_unet_blocks_0_self_attn_q"
KFFN = "lora_unet_blocks_1_ffn_0"


@pytest.fixture(scope="module")
def base_sd() -> dict[str, torch.Tensor]:
    return load_file(T2V)


def randn(*shape, seed=0, scale=0.3):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def merged(tmp_path, base_sd, tensors, multiplier=1.0, **kwargs):
    path = tmp_path / "l.safetensors"
    save_file(tensors, str(path))
    merge = LoraMerge([LoraSpec(path, multiplier)], **kwargs)
    return merge({k: v.clone() for k, v in base_sd.items()}), merge


def close(a, b):
    torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# DoRA
# --------------------------------------------------------------------------------------------


def test_peft_dora_magnitude_vector(tmp_path, base_sd):
    """diffusers/PEFT: W' = m * (W + s BA) / ||W + s BA|| with the norm of each output row."""
    w = base_sd[Q + ".weight"].double()
    a, b = randn(4, 64, seed=1), randn(64, 4, seed=2)
    m = w.norm(dim=1) * (1 + randn(64, seed=3, scale=0.2).double())
    tensors = {
        "transformer.blocks.0.attn1.to_q.lora_A.weight": a,
        "transformer.blocks.0.attn1.to_q.lora_B.weight": b,
        "transformer.blocks.0.attn1.to_q.lora_magnitude_vector": m.float(),
    }
    sd, merge = merged(tmp_path, base_sd, tensors)
    v = w + b.double() @ a.double()
    want = m[:, None] * v / torch.linalg.norm(v, dim=1, keepdim=True)
    close(sd[Q + ".weight"], want)
    assert merge.reports[0].merged == (Q,) and merge.reports[0].merged_keys == 3
    assert not merge.reports[0].unmatched_keys
    # the plain-LoRA answer would be 9-21 % off: make sure the difference shows
    assert (sd[Q + ".weight"].double() - v).abs().max() > 1e-2


def test_peft_dora_equals_peft_merge():
    """The same tensors merged by PEFT itself (LoraConfig(use_dora=True) on a Linear, merge_and_unload)."""
    peft = pytest.importorskip("peft")
    from wan_kernel.lora import LoraModule

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 8, bias=False))
    original = base[0].weight.detach().clone()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(randn(4, 16, seed=1))
        layer.lora_B["default"].weight.copy_(randn(8, 4, seed=2))
        layer.lora_magnitude_vector["default"].weight.copy_(randn(8, seed=3).abs() + 0.5)
    module = LoraModule(
        name="0",
        tensors={
            "down": layer.lora_A["default"].weight.detach().clone(),
            "up": layer.lora_B["default"].weight.detach().clone(),
            "magnitude": layer.lora_magnitude_vector["default"].weight.detach().clone(),
        },
        alpha=8.0,
    )
    ours = module.merged_weight(original.float(), 1.0)
    theirs = model.merge_and_unload()[0].weight.detach()
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("axis", ["output", "input"])
def test_lycoris_dora_scale_both_orientations(axis, tmp_path, base_sd):
    """.dora_scale [out, 1]: norm per output row; [1, in]: norm per input column (LyCORIS, ComfyUI)."""
    w = base_sd[FFN + ".weight"].double()  # [128, 64]
    down, up = randn(4, 64, seed=4), randn(128, 4, seed=5)
    v = w + (2.0 / 4) * (up.double() @ down.double())
    eps = torch.finfo(torch.float32).eps
    if axis == "output":
        scale = (w.norm(dim=1, keepdim=True) * 1.1).float()  # [128, 1]
        want = scale.double() * v / (v.norm(dim=1, keepdim=True) + eps)
    else:
        scale = (w.norm(dim=0, keepdim=True) * 0.9).float()  # [1, 64]
        want = scale.double() * v / (v.norm(dim=0, keepdim=True) + eps)
    tensors = {
        KFFN + ".lora_down.weight": down,
        KFFN + ".lora_up.weight": up,
        KFFN + ".alpha": torch.tensor(2.0),
        KFFN + ".dora_scale": scale,
    }
    sd, _ = merged(tmp_path, base_sd, tensors)
    close(sd[FFN + ".weight"], want)
    half, _ = merged(tmp_path, base_sd, tensors, multiplier=0.5)  # ComfyUI's strength rule
    close(half[FFN + ".weight"], w + 0.5 * (want - w))


# --------------------------------------------------------------------------------------------
# LoHa
# --------------------------------------------------------------------------------------------


def test_loha(tmp_path, base_sd):
    """dW = (w1a @ w1b) * (w2a @ w2b) * alpha / r, r = w1b.shape[0] (musubi networks/loha.py merge_to)."""
    w1a, w1b, w2a, w2b = (
        randn(128, 4, seed=1),
        randn(4, 64, seed=2),
        randn(128, 4, seed=3),
        randn(4, 64, seed=4),
    )
    tensors = {
        KFFN + ".hada_w1_a": w1a,
        KFFN + ".hada_w1_b": w1b,
        KFFN + ".hada_w2_a": w2a,
        KFFN + ".hada_w2_b": w2b,
        KFFN + ".alpha": torch.tensor(3.0),
    }
    sd, merge = merged(tmp_path, base_sd, tensors, multiplier=0.7)
    delta = (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double()) * 3.0 / 4
    close(sd[FFN + ".weight"], base_sd[FFN + ".weight"].double() + 0.7 * delta)
    assert merge.reports[0].merged_keys == 5


def test_loha_tucker_on_the_patch_conv(tmp_path, base_sd):
    """Tucker LoHa (hada_t1/t2, wa [r, out], wb [r, in]) on the Conv3d patch embedding."""
    w = base_sd["patch_embedding.weight"]  # [64, 16, 1, 2, 2]
    r = 3
    t1, t2 = randn(r, r, 1, 2, 2, seed=1), randn(r, r, 1, 2, 2, seed=2)
    w1a, w1b, w2a, w2b = (
        randn(r, 64, seed=3),
        randn(r, 16, seed=4),
        randn(r, 64, seed=5),
        randn(r, 16, seed=6),
    )
    stem = "lora_unet_patch_embedding"
    tensors = {
        f"{stem}.hada_t1": t1, f"{stem}.hada_t2": t2, f"{stem}.hada_w1_a": w1a, f"{stem}.hada_w1_b": w1b,
        f"{stem}.hada_w2_a": w2a, f"{stem}.hada_w2_b": w2b, f"{stem}.alpha": torch.tensor(1.5),
    }  # fmt: skip
    sd, _ = merged(tmp_path, base_sd, tensors)
    # by hand: W1[p, r, k] = sum_ij t1[i, j, k] w1b[j, r] w1a[i, p]
    m1 = torch.einsum("ijabc,jr,ip->prabc", t1.double(), w1b.double(), w1a.double())
    m2 = torch.einsum("ijabc,jr,ip->prabc", t2.double(), w2b.double(), w2a.double())
    close(sd["patch_embedding.weight"], w.double() + m1 * m2 * 1.5 / r)


# --------------------------------------------------------------------------------------------
# LoKr
# --------------------------------------------------------------------------------------------


def kron_case(kind):
    """(tensors without alpha, the Kronecker product by hand, the rank alpha divides or None)."""
    w1 = randn(8, 4, seed=1)  # 8 * 16 = 128 out, 4 * 16 = 64 in
    if kind == "w2_factorised":
        a, b = randn(16, 2, seed=2), randn(2, 16, seed=3)
        return (
            {"lokr_w1": w1, "lokr_w2_a": a, "lokr_w2_b": b},
            torch.kron(w1.double(), a.double() @ b.double()),
            2,
        )
    if kind == "w1_factorised":
        a, b, w2 = randn(8, 3, seed=4), randn(3, 4, seed=5), randn(16, 16, seed=6)
        return (
            {"lokr_w1_a": a, "lokr_w1_b": b, "lokr_w2": w2},
            torch.kron(a.double() @ b.double(), w2.double()),
            3,
        )
    w2 = randn(16, 16, seed=7)
    return {"lokr_w1": w1, "lokr_w2": w2}, torch.kron(w1.double(), w2.double()), None


@pytest.mark.parametrize("kind", ["w2_factorised", "w1_factorised", "full"])
def test_lokr(kind, tmp_path, base_sd):
    """dW = kron(w1, w2) * alpha / r when a factorised part exists; both parts full: scale 1
    (LyCORIS, ComfyUI)."""
    parts, product, rank = kron_case(kind)
    tensors = {f"{KFFN}.{k}": v for k, v in parts.items()}
    tensors[KFFN + ".alpha"] = torch.tensor(4.0)
    sd, _ = merged(tmp_path, base_sd, tensors)
    scale = 1.0 if rank is None else 4.0 / rank
    close(sd[FFN + ".weight"], base_sd[FFN + ".weight"].double() + scale * product)


def test_musubi_full_matrix_lokr_scale(tmp_path, base_sd):
    """A musubi-tuner LoKr (its network-level lokr_factor tensor) with a full w2: alpha / max(w2.shape)."""
    parts, product, _ = kron_case("full")
    tensors = {f"{KFFN}.{k}": v for k, v in parts.items()}
    tensors[KFFN + ".alpha"] = torch.tensor(4.0)
    tensors["lokr_factor"] = torch.tensor(-1, dtype=torch.int64)
    sd, merge = merged(tmp_path, base_sd, tensors)
    close(sd[FFN + ".weight"], base_sd[FFN + ".weight"].double() + 4.0 / 16 * product)
    assert not merge.reports[0].unmatched_keys  # lokr_factor is the network's, not unmatched


# --------------------------------------------------------------------------------------------
# Spellings and unmatched tensors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "down_key, up_key",
    [
        ("diffusion_model.blocks.0.self_attn.q.lora_A", "diffusion_model.blocks.0.self_attn.q.lora_B"),
        ("lora_unet_blocks_0_self_attn_q_lora.down.weight", "lora_unet_blocks_0_self_attn_q_lora.up.weight"),
        (
            "diffusion_model.blocks.0.self_attn.q.lora_linear_layer.down.weight",
            "diffusion_model.blocks.0.self_attn.q.lora_linear_layer.up.weight",
        ),
        (
            "diffusion_model.blocks.0.self_attn.q.lora.down.weight",
            "diffusion_model.blocks.0.self_attn.q.lora.up.weight",
        ),
    ],
)
def test_comfyui_spellings(down_key, up_key, tmp_path, base_sd):
    down, up = randn(4, 64, seed=1), randn(64, 4, seed=2)
    sd, merge = merged(tmp_path, base_sd, {down_key: down, up_key: up})
    close(sd[Q + ".weight"], base_sd[Q + ".weight"].double() + up.double() @ down.double())
    assert merge.reports[0].merged == (Q,) and not merge.reports[0].unmatched_keys


def test_diff_and_diff_b_as_their_own_keys(tmp_path, base_sd):
    diff, diff_b = randn(64, 64, seed=1, scale=0.01), randn(64, seed=2)
    tensors = {
        "diffusion_model.blocks.0.self_attn.q.diff": diff,
        "diffusion_model.blocks.0.self_attn.q.diff_b": diff_b,
    }
    sd, _ = merged(tmp_path, base_sd, tensors, multiplier=2.0)
    close(sd[Q + ".weight"], base_sd[Q + ".weight"].double() + 2 * diff.double())
    close(sd[Q + ".bias"], base_sd[Q + ".bias"].double() + 2 * diff_b.double())


def unmatched_file(tmp_path) -> Path:
    tensors = {
        KQ + ".lora_down.weight": randn(4, 64, seed=1),
        KQ + ".lora_up.weight": randn(64, 4, seed=2),
        KQ + ".alpha": torch.tensor(4.0),
        KQ + ".lora_mid.weight": randn(4, 4, 1, 1, seed=3),  # an unknown suffix for this module
        "lora_unet_blocks_0_cross_attn_k_img.lora_down.weight": randn(4, 64, seed=4),  # an i2v module
        "lora_unet_blocks_0_cross_attn_k_img.lora_up.weight": randn(64, 4, seed=5),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0),  # a lone alpha
    }
    path = tmp_path / "partly.safetensors"
    save_file(tensors, str(path))
    return path


def test_every_key_is_merged_or_reported(tmp_path, base_sd):
    path = unmatched_file(tmp_path)
    lines: list[str] = []
    merge = LoraMerge([path], log=lines.append)
    with pytest.warns(LoraWarning, match="4 tensor"):
        sd = merge(dict(base_sd))
    report = merge.reports[0]
    assert report.merged == (Q,) and report.merged_keys == 3
    assert set(report.unmatched_keys) == {
        KQ + ".lora_mid.weight",
        "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha",
        "lora_unet_blocks_0_cross_attn_k_img.lora_down.weight",
        "lora_unet_blocks_0_cross_attn_k_img.lora_up.weight",
    }
    assert report.merged_keys + len(report.unmatched_keys) == len(load_file(path))
    assert "4 tensor(s) not merged" in lines[0] and "k_img" in lines[0]
    assert not torch.equal(sd[Q + ".weight"], base_sd[Q + ".weight"])


def test_strict_makes_unmatched_keys_an_error(tmp_path, base_sd):
    path = unmatched_file(tmp_path)
    sd = dict(base_sd)
    with pytest.raises(InputError, match=r"4 tensor\(s\) of the LoRA match nothing.*3 matched"):
        LoraMerge([path], strict=True)(sd)
    assert all(sd[k] is base_sd[k] for k in base_sd)  # nothing changed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoraMerge([read_lora_clean(tmp_path)], strict=True)(dict(base_sd))  # a clean file passes strict


def read_lora_clean(tmp_path) -> Path:
    path = tmp_path / "clean.safetensors"
    save_file({KQ + ".lora_down.weight": randn(4, 64), KQ + ".lora_up.weight": randn(64, 4)}, str(path))
    assert read_lora(path).modules[KQ].kind == "lora"
    return path


@pytest.mark.parametrize("musubi", [False, True])
@pytest.mark.parametrize("kind", ["loha", "lokr_factorised", "lokr_full"])
def test_loha_lokr_convert_without_changing_the_delta(kind, musubi, tmp_path, base_sd):
    """LoHa/LoKr keep their tensors through every layout that holds them; a full-matrix LoKr gets
    its scale baked in (the tools disagree on its alpha), so its delta stays the same everywhere."""
    from wan_kernel.lora import convert as lora_convert

    if kind == "loha":
        tensors = {f"{KFFN}.hada_w1_a": randn(128, 4), f"{KFFN}.hada_w1_b": randn(4, 64, seed=1)}
        tensors |= {f"{KFFN}.hada_w2_a": randn(128, 4, seed=2), f"{KFFN}.hada_w2_b": randn(4, 64, seed=3)}
    else:
        parts, _, _ = kron_case("w2_factorised" if kind == "lokr_factorised" else "full")
        tensors = {f"{KFFN}.{k}": v for k, v in parts.items()}
    tensors[KFFN + ".alpha"] = torch.tensor(3.0)
    if musubi:
        tensors["lokr_factor"] = torch.tensor(-1)
    src = tmp_path / "src.safetensors"
    save_file(tensors, str(src))
    want, _ = merged(tmp_path, base_sd, tensors)
    for target in ("kohya", "comfyui"):
        out = lora_convert.convert_lora(src, tmp_path / f"{target}.safetensors", target).path
        got = LoraMerge([out])({k: v.clone() for k, v in base_sd.items()})
        close(got[FFN + ".weight"], want[FFN + ".weight"])
    with pytest.raises(InputError, match="diffusers layout cannot hold"):
        lora_convert.convert_lora(src, tmp_path / "d.safetensors", "diffusers")


@pytest.mark.cuda
def test_merge_computed_on_cuda_equals_cpu(tmp_path, base_sd):
    """LoraMerge(device="cuda") (what generate passes) merges on the GPU, tensors go back where they were."""
    tensors = {
        KFFN + ".hada_w1_a": randn(128, 4), KFFN + ".hada_w1_b": randn(4, 64, seed=1),
        KFFN + ".hada_w2_a": randn(128, 4, seed=2), KFFN + ".hada_w2_b": randn(4, 64, seed=3),
        KQ + ".lora_down.weight": randn(4, 64, seed=4), KQ + ".lora_up.weight": randn(64, 4, seed=5),
        KQ + ".dora_scale": base_sd[Q + ".weight"].norm(dim=1, keepdim=True) * 1.1,
    }  # fmt: skip
    cpu, _ = merged(tmp_path, base_sd, tensors)
    gpu, _ = merged(tmp_path, base_sd, tensors, device="cuda")
    for key in (FFN + ".weight", Q + ".weight"):
        assert gpu[key].device.type == "cpu"
        torch.testing.assert_close(gpu[key], cpu[key], atol=1e-5, rtol=1e-5)

"""The Wan2.1 VAE against the official fixture, diffusers' AutoencoderKLWan, and its loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wan_kernel.errors import InputError, WeightsError
from wan_kernel.models.vae import FeatureCache, VAEConfig, WanVAEModel
from wan_kernel.models.vae_loading import load_vae, vae_state_dict_from, vae_state_dict_to
from wan_kernel.models.weights import load_state_dict
from wan_kernel.testing import REFERENCE_FIXTURES, read_reference_case

FIXTURES = REFERENCE_FIXTURES
CASE_DIR = FIXTURES / "vae"
WEIGHTS = CASE_DIR / "weights.safetensors"

pytestmark = pytest.mark.skipif(not CASE_DIR.is_dir(), reason=f"reference fixtures not found at {CASE_DIR}")

# bf16 keeps 8 mantissa bits (~0.4% per rounding); measured on the fixture: mu relative RMS error
# 0.9%, max 0.024; clamped reconstruction RMS 0.016, max 0.12. The bounds leave ~3x headroom.
BF16_MU_REL_RMS = 0.03
BF16_MU_MAX = 0.08
BF16_RECON_RMS = 0.05


@pytest.fixture(scope="module")
def case():
    return read_reference_case(CASE_DIR)


@pytest.fixture(scope="module")
def official_state():
    return load_state_dict(WEIGHTS)


@pytest.fixture(scope="module")
def vae():
    return load_vae(WEIGHTS)


def assert_output(case, name, actual, expected=None):
    meta, tensors = case
    tol = meta["tolerance"]["per_output"][name]
    expected = tensors[name] if expected is None else expected
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=tol["atol"], rtol=tol["rtol"])


def check_against_fixture(vae, case):
    _, t = case
    assert_output(case, "mu_video", vae.encode(t["video"]))
    assert_output(case, "recon_video", vae.decode(t["mu_video"]), t["recon_video"].clamp(-1, 1))
    assert_output(case, "mu_image", vae.encode(t["image"]))
    assert_output(case, "recon_image", vae.decode(t["mu_image"]), t["recon_image"].clamp(-1, 1))


# ------------------------------------------------------------------------------ fixture parity

def test_matches_official_fixture(vae, case):
    assert vae.model.config == VAEConfig(dim=8, z_dim=16)
    check_against_fixture(vae, case)


def test_unclamped_decode_matches_raw_fixture(vae, case):
    _, t = case
    recon = vae.decode(t["mu_video"], clamp=False)
    assert recon.abs().max() > 1.0  # the fixture's reconstruction does leave [-1, 1]
    assert_output(case, "recon_video", recon)
    assert_output(case, "recon_image", vae.decode(t["mu_image"], clamp=False))


def test_decode_is_clamped(vae, case):
    recon = vae.decode(case[1]["mu_video"])
    assert recon.min() >= -1.0 and recon.max() <= 1.0


def test_pth_file(tmp_path, official_state, case):
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save({k: v.clone() for k, v in official_state.items()}, path)
    check_against_fixture(load_vae(path), case)


@pytest.mark.parametrize("prefix", ["vae.", "first_stage_model."])
def test_comfyui_prefixed_safetensors(tmp_path, official_state, case, prefix):
    path = tmp_path / "wan_2.1_vae.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in official_state.items()}, str(path))
    vae = load_vae(path)
    _, t = case
    assert_output(case, "mu_image", vae.encode(t["image"]))


# ------------------------------------------------------------------------------ diffusers layout

def _diffusers_folder(root: Path, official_state) -> Path:
    folder = root / "vae"
    folder.mkdir(parents=True)
    converted = vae_state_dict_to("diffusers", official_state)
    weights = folder / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in converted.items()}, str(weights))
    config = {"_class_name": "AutoencoderKLWan", "base_dim": 8, "z_dim": 16}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_diffusers_layout_folder_file_and_pipeline(tmp_path, official_state, case):
    folder = _diffusers_folder(tmp_path / "pipe", official_state)
    check_against_fixture(load_vae(folder), case)
    _, t = case
    for path in (folder / "diffusion_pytorch_model.safetensors", tmp_path / "pipe"):
        assert_output(case, "mu_image", load_vae(path).encode(t["image"]))


def test_converter_round_trip(official_state):
    diffusers_state = vae_state_dict_to("diffusers", official_state)
    assert len(diffusers_state) == len(official_state)
    assert "decoder.up_blocks.0.upsamplers.0.time_conv.weight" in diffusers_state
    assert "decoder.up_blocks.1.resnets.0.conv_shortcut.weight" in diffusers_state
    back = vae_state_dict_from("diffusers", diffusers_state)
    assert back.keys() == official_state.keys()
    assert all(back[k] is official_state[k] for k in official_state)
    for layout in ("official", "comfyui"):
        assert vae_state_dict_to(layout, official_state).keys() == official_state.keys()
    with pytest.raises(InputError, match="known: official, comfyui, diffusers"):
        vae_state_dict_to("kohya", official_state)


def test_converter_matches_diffusers_real_size():
    """Key names and shapes of the real (dim 96) model map one-to-one onto diffusers' defaults."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ours = WanVAEModel(VAEConfig()).state_dict()
        theirs = diffusers.AutoencoderKLWan().state_dict()
    converted = vae_state_dict_to("diffusers", ours)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    back = vae_state_dict_from("diffusers", dict(theirs))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in ours.items()}


@pytest.fixture(scope="module")
def diffusers_vae(official_state):
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16)
    model.load_state_dict(vae_state_dict_to("diffusers", official_state), strict=True)
    return model.eval()


def _diffusers_encode(model, video):
    mean = torch.tensor(model.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(model.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        return (model.encode(video).latent_dist.mean - mean) / std


def test_diffusers_autoencoder_agrees(diffusers_vae, vae, case):
    """Our converted weights in diffusers' own class give the fixture's latents: proves the converter."""
    _, t = case
    assert_output(case, "mu_video", _diffusers_encode(diffusers_vae, t["video"]))


def test_other_sizes_agree_with_diffusers(diffusers_vae, vae):
    """13 frames, non-square 40x24: 4 latent frames (more chunks than the fixture), batch of 2."""
    gen = torch.Generator().manual_seed(3)
    video = torch.rand(2, 3, 13, 40, 24, generator=gen) * 2 - 1
    ours = vae.encode(video)
    assert ours.shape == (2, 16, 4, 5, 3)
    torch.testing.assert_close(ours, _diffusers_encode(diffusers_vae, video), atol=5e-5, rtol=1e-5)
    mean = torch.tensor(diffusers_vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(diffusers_vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        theirs = diffusers_vae.decode(ours[:1] * std + mean).sample
    decoded = vae.decode(ours[:1])
    assert decoded.shape == (1, 3, 13, 40, 24)
    torch.testing.assert_close(decoded, theirs, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------ batching, cache, dtype

def test_batch_equals_singles(vae, case):
    _, t = case
    video = torch.cat([t["video"], t["video"].flip(-1) * 0.5])
    batched = vae.encode(video)
    singles = torch.cat([vae.encode(v) for v in video.split(1)])
    assert torch.equal(batched, singles)
    assert not torch.equal(batched[0], batched[1])
    decoded = vae.decode(batched)
    assert torch.equal(decoded, torch.cat([vae.decode(z) for z in batched.split(1)]))


def test_cache_on_cpu_gives_identical_results(case, vae):
    _, t = case
    cpu_cached = load_vae(WEIGHTS, cache_device="cpu")
    assert torch.equal(cpu_cached.encode(t["video"]), vae.encode(t["video"]))
    assert torch.equal(cpu_cached.decode(t["mu_video"]), vae.decode(t["mu_video"]))


def test_feature_cache_stores_copies_on_its_device():
    cache = FeatureCache("cpu")
    x = torch.arange(24.0).view(1, 1, 3, 2, 4)
    assert cache.read(x) is None
    cache.write(x[:, :, -2:])
    cache.start_chunk()
    stored = cache.read(x)
    assert stored.device.type == "cpu" and torch.equal(stored, x[:, :, -2:])
    assert stored.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


@pytest.mark.cuda
def test_cuda_with_cpu_cache_matches_gpu_cache(cuda_device, case):
    _, t = case
    on_gpu = load_vae(WEIGHTS, device=cuda_device)
    cpu_cache = load_vae(WEIGHTS, device=cuda_device, cache_device="cpu")
    latents = on_gpu.encode(t["video"])
    assert latents.device.type == "cuda"
    torch.testing.assert_close(cpu_cache.encode(t["video"]), latents, atol=0, rtol=0)
    torch.testing.assert_close(cpu_cache.decode(latents), on_gpu.decode(latents), atol=0, rtol=0)
    assert_output(case, "mu_video", latents.cpu())


def test_bf16_within_documented_bound(case):
    _, t = case
    vae = load_vae(WEIGHTS, dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16
    mu = vae.encode(t["video"])
    assert mu.dtype == torch.float32
    expected = t["mu_video"]
    err = mu - expected
    assert err.pow(2).mean().sqrt() / expected.pow(2).mean().sqrt() < BF16_MU_REL_RMS
    assert err.abs().max() < BF16_MU_MAX
    recon = vae.decode(expected)
    assert recon.dtype == torch.float32
    assert (recon - t["recon_video"].clamp(-1, 1)).pow(2).mean().sqrt() < BF16_RECON_RMS


# ------------------------------------------------------------------------------ input validation

@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 4, 5, 16, 16), "3 colour channels"),
        ((1, 3, 8, 16, 16), "1 \\+ 4k frames"),
        ((1, 3, 5, 60, 16), "multiples of 8"),
        ((1, 3, 5, 16, 12), "multiples of 8"),
        ((3, 5, 16, 16), "5-D"),
    ],
)
def test_encode_rejects_bad_video(vae, shape, message):
    with pytest.raises(InputError, match=message):
        vae.encode(torch.zeros(shape))


def test_encode_rejects_integer_pixels(vae):
    with pytest.raises(InputError, match="floating-point"):
        vae.encode(torch.zeros(1, 3, 1, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("shape", "message"), [((1, 4, 2, 2, 2), "16 latent channels"), ((16, 2, 2, 2), "5-D")]
)
def test_decode_rejects_bad_latents(vae, shape, message):
    with pytest.raises(InputError, match=message):
        vae.decode(torch.zeros(shape))


def test_rejects_unsupported_dtype():
    with pytest.raises(InputError, match="dtype"):
        load_vae(WEIGHTS, dtype=torch.int8)


# ------------------------------------------------------------------------------ weight errors

def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="VAE file not found"):
        load_vae(tmp_path / "nope.safetensors")


@pytest.mark.parametrize(
    ("keys", "kind"),
    [
        (["patch_embedding.weight", "blocks.0.self_attn.q.weight", "head.head.weight"], "Wan DiT"),
        (["token_embedding.weight", "blocks.0.attn.q.weight"], "T5"),
    ],
)
def test_other_model_given_as_vae(tmp_path, keys, kind):
    path = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    with pytest.raises(WeightsError, match=f"looks like a[n]? {kind}.*not a Wan2.1 VAE"):
        load_vae(path)


def test_missing_and_unexpected_keys_are_listed(tmp_path, official_state):
    state = {k: v.contiguous() for k, v in official_state.items() if k != "decoder.head.2.bias"}
    state["decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError) as info:
        load_vae(path)
    message = str(info.value)
    assert "missing 1 tensor(s): decoder.head.2.bias" in message
    assert "unexpected 1 tensor(s): decoder.extra.weight" in message


def test_wrong_shape_is_reported(tmp_path, official_state):
    state = {k: v.contiguous() for k, v in official_state.items()}
    state["decoder.head.2.bias"] = torch.zeros(4)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError, match="wrong shape: decoder.head.2.bias"):
        load_vae(path)

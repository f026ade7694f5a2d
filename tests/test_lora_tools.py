"""``wan lora`` tools: layout round trips, other tools loading our files, merging, info, resize, EMA, the CLI.

Every written layout must change the tiny fixture DiT by exactly the delta of the source file (our
reader, diffusers' own Wan LoRA loader, and ComfyUI's key map); merging into a DiT file and then
generating must equal generating with the LoRA applied at load time.
"""

from __future__ import annotations

import errno
import json
import os
import re
import types

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from wan_kernel.errors import InputError, OutputError
from wan_kernel.lora import LoraMerge, LoraSpec, kohya_hashes, read_lora
from wan_kernel.lora import convert as lora_convert
from wan_kernel.lora import ema as lora_ema
from wan_kernel.lora import info as lora_info
from wan_kernel.lora import merge as lora_merge
from wan_kernel.lora import resize as lora_resize
from wan_kernel.models.dit_keys import dit_state_dict_to
from wan_kernel.lora import save_lora_file
from wan_kernel.testing import REFERENCE_FIXTURES, plugin_or_skip
from wan_kernel.testing.bad_input import killed_run_temporary, leftover_temporaries

FIXTURES = REFERENCE_FIXTURES
T2V = FIXTURES / "dit_t2v" / "weights.safetensors"
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"reference fixtures not found at {FIXTURES}")

BLOCK_LINEARS = [f"self_attn.{p}" for p in "qkvo"] + [f"cross_attn.{p}" for p in "qkvo"] + ["ffn.0", "ffn.2"]
BLOCKS = [f"blocks.{i}.{m}" for i in range(2) for m in BLOCK_LINEARS]
LAYOUTS = ["kohya", "comfyui", "diffusers"]


@pytest.fixture(scope="module")
def base_sd() -> dict[str, torch.Tensor]:
    return load_file(T2V)


def kohya_file(
    path, sd, targets=BLOCKS, *, ranks=(4,), alphas=(2.0,), dtype=torch.float32, seed=0, metadata=None
):
    """A kohya LoRA on ``targets`` (rank and alpha cycle through ``ranks`` / ``alphas``)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, name in enumerate(targets):
        w = sd[name + ".weight"]
        r, a = ranks[i % len(ranks)], alphas[i % len(alphas)]
        stem = "lora_unet_" + name.replace(".", "_")
        tensors[stem + ".lora_down.weight"] = (torch.randn(r, *w.shape[1:], generator=g) * 0.3).to(dtype)
        up_shape = (w.shape[0], r, *([1] * (w.dim() - 2)))
        tensors[stem + ".lora_up.weight"] = (torch.randn(up_shape, generator=g) * 0.3).to(dtype)
        tensors[stem + ".alpha"] = torch.tensor(a)
    save_file(
        tensors, str(path), metadata=metadata or {"ss_network_dim": str(ranks[0]), "ss_output_name": "t"}
    )
    return path


def deltas(path) -> dict[str, torch.Tensor]:
    """Official module path -> the float64 delta the file makes (our reader)."""
    out = {}
    for target, module in read_lora(path).by_official_path.items():
        out[target] = module.product().double() * module.scale
    return out


def assert_same_deltas(a, b, rel=1e-6):
    da, db = deltas(a), deltas(b)
    assert da.keys() == db.keys()
    for k in da:
        err = (da[k] - db[k]).abs().max() / da[k].abs().max()
        assert err < rel, (k, float(err))


# --------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trips_between_all_layouts_are_exact(tmp_path, base_sd, dtype):
    targets = [*BLOCKS, "text_embedding.0", "patch_embedding"]  # a conv LoRA too
    src = kohya_file(
        tmp_path / "src.safetensors", base_sd, targets, ranks=(4, 2, 3), alphas=(2.0, 8.0, 3.0), dtype=dtype
    )
    for first in LAYOUTS:
        for second in LAYOUTS:
            a = lora_convert.convert_lora(src, tmp_path / f"{first}.safetensors", first, overwrite=True).path
            b = lora_convert.convert_lora(
                a, tmp_path / f"{first}-{second}.safetensors", second, overwrite=True
            ).path
            assert_same_deltas(src, a)
            assert_same_deltas(src, b)


def test_metadata_is_carried_and_hashes_recomputed(tmp_path, base_sd):
    meta = {"ss_network_dim": "4", "modelspec.title": "fox", "sshs_model_hash": "stale"}
    src = kohya_file(tmp_path / "src.safetensors", base_sd, metadata=meta)
    out = lora_convert.convert_lora(src, tmp_path / "c.safetensors", "other").path
    with safe_open(str(out), "pt") as f:
        written = f.metadata()
    assert written["ss_network_dim"] == "4" and written["modelspec.title"] == "fox"
    assert written["sshs_model_hash"], written["sshs_legacy_hash"] == kohya_hashes(load_file(out), written)
    # kohya's definition by hand: sha256 of the tensor bytes of safetensors.torch.save(tensors, ss_* meta)
    import hashlib

    from safetensors.torch import save

    data = save(load_file(out), {k: v for k, v in written.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    assert written["sshs_model_hash"] == hashlib.sha256(data[8 + n :]).hexdigest()


def test_seed_target_spellings_and_prefix(tmp_path, base_sd):
    src = kohya_file(tmp_path / "src.safetensors", base_sd)
    other = lora_convert.convert_lora(
        src, tmp_path / "o.safetensors", "other", prefix="model.diffusion_model"
    ).path
    keys = list(load_file(other))
    assert all(k.startswith("model.diffusion_model.blocks.") for k in keys)
    assert not any(k.endswith(".alpha") for k in keys)  # folded in, as convert_lora.py --target other
    back = lora_convert.convert_lora(other, tmp_path / "d.safetensors", "default").path
    assert all(k.startswith("lora_unet_blocks_") for k in load_file(back))
    assert_same_deltas(src, back)


def test_outputs_are_never_overwritten_without_asking(tmp_path, base_sd):
    src = kohya_file(tmp_path / "src.safetensors", base_sd)
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep")
    with pytest.raises(InputError, match="exists; pass --overwrite"):
        lora_convert.convert_lora(src, out, "other")
    assert out.read_bytes() == b"keep"
    assert not leftover_temporaries(tmp_path)


def test_overwrite_replaces_in_one_step(tmp_path, base_sd):
    src = kohya_file(tmp_path / "src.safetensors", base_sd)
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    assert lora_convert.convert_lora(src, out, "other", overwrite=True).path == out
    assert_same_deltas(src, out)
    assert not leftover_temporaries(tmp_path)


def _full_disk(tensors, name, metadata=None):
    from pathlib import Path

    Path(name).write_bytes(b"half a file")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_a_clean_error_and_leaves_no_temporary(tmp_path, base_sd, monkeypatch):
    import safetensors.torch

    src = kohya_file(tmp_path / "src.safetensors", base_sd)
    out = tmp_path / "out" / "c.safetensors"
    monkeypatch.setattr(safetensors.torch, "save_file", _full_disk)
    with pytest.raises(OutputError, match="disk is full") as info:
        save_lora_file(out, load_file(src))
    assert str(out) in str(info.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    # the command: a clean message, an existing output kept whole under --overwrite
    out.parent.mkdir(exist_ok=True)
    out.write_bytes(b"keep")
    r = wan("lora", "convert", "--input", src, "--output", out, "--target", "other", "--overwrite")
    assert r.exit_code != 0 and "disk is full" in r.output and str(out) in r.output, r.output
    assert "Traceback" not in r.output
    assert out.read_bytes() == b"keep"
    assert not leftover_temporaries(tmp_path)


def test_a_killed_runs_temporary_is_removed_by_the_next_lora_write(tmp_path, base_sd):
    src = kohya_file(tmp_path / "src.safetensors", base_sd)
    stale = killed_run_temporary(tmp_path / "out" / "a.safetensors")
    path = save_lora_file(tmp_path / "out" / "b.safetensors", load_file(src))
    assert not stale.exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == [path.name] == ["b.safetensors"]


def comfyui_key_map(official_sd) -> set[str]:
    """ComfyUI's accepted LoRA key prefixes for a Wan model (comfy/lora.py ``model_lora_keys_unet`` at
    Comfy-Org/ComfyUI 17358c8f: for every ``diffusion_model.<k>.weight``, ``lora_unet_<k with _>`` and
    ``diffusion_model.<k>``; other keys by their own name. No Wan-specific entries exist there)."""
    accepted = set()
    for key in official_sd:
        full = "diffusion_model." + key
        if full.endswith(".weight"):
            accepted.add("lora_unet_" + key[: -len(".weight")].replace(".", "_"))
            accepted.add(full[: -len(".weight")])
        else:
            accepted.add(full)
    return accepted


# load_lora's per-module tensors (comfy/lora.py and comfy/weight_adapter/*.py at the same commit)
COMFY_SUFFIXES = re.compile(
    r"\.(lora_A\.weight|lora_B\.weight|lora_up\.weight|lora_down\.weight|alpha|dora_scale|diff|diff_b|"
    r"hada_w[12]_[ab]|hada_t[12]|lokr_w[12](_[ab])?|lokr_t2)$"
)


@pytest.mark.parametrize("target", ["comfyui", "kohya"])
def test_comfyui_key_map_accepts_every_key(target, tmp_path, base_sd):
    src = kohya_file(tmp_path / "src.safetensors", base_sd, [*BLOCKS, "head.head", "patch_embedding"])
    out = lora_convert.convert_lora(src, tmp_path / "o.safetensors", target).path
    accepted = comfyui_key_map(base_sd)
    for key in load_file(out):
        m = COMFY_SUFFIXES.search(key)
        assert m and key[: m.start()] in accepted, key


# --------------------------------------------------------------------------------------------
# diffusers' own loader
# --------------------------------------------------------------------------------------------


class _Loader:
    """The smallest host of diffusers' ``WanLoraLoaderMixin`` (what ``WanPipeline`` inherits)."""

    transformer_name = "transformer"
    _lora_loadable_modules = ("transformer",)
    hf_device_map = None
    components = types.MappingProxyType({})


def diffusers_transformer(official_sd):
    from wan_kernel.models.dit_config import infer_dit_config
    from wan_kernel.models.dit_keys import diffusers_config

    diffusers = pytest.importorskip("diffusers")
    t = diffusers.WanTransformer3DModel(**diffusers_config(infer_dit_config(official_sd, num_heads=2)))
    missing, unexpected = t.load_state_dict(dit_state_dict_to("diffusers", official_sd), strict=False)
    assert not missing and not unexpected
    return t.eval()


def diffusers_forward(transformer):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 16, 1, 4, 6, generator=g), torch.randn(1, 5, 48, generator=g)
    with torch.no_grad():
        return transformer(x, torch.tensor([700.0]), ctx, return_dict=False)[0]


def diffusers_with_lora(base_sd, path):
    pytest.importorskip("peft")
    from diffusers.loaders import WanLoraLoaderMixin

    transformer = diffusers_transformer(base_sd)
    host = type("Host", (_Loader, WanLoraLoaderMixin), {})()
    host.transformer = transformer
    host.load_lora_weights(str(path), adapter_name="wan")
    return transformer


@pytest.mark.parametrize("target", LAYOUTS)
def test_converted_files_load_in_diffusers_with_wans_output(target, tmp_path, base_sd):
    """diffusers' WanLoraLoaderMixin.load_lora_weights on a tiny WanTransformer3DModel gives the output of
    the model whose weights wan merged. Mixed ranks and alphas (diffusers needs the PEFT config for those)."""
    src = kohya_file(tmp_path / "src.safetensors", base_sd, ranks=(4, 2), alphas=(2.0, 8.0))
    out = lora_convert.convert_lora(src, tmp_path / f"{target}.safetensors", target).path
    merged = LoraMerge([src])({k: v.clone() for k, v in base_sd.items()})
    want = diffusers_forward(diffusers_transformer(merged))
    got = diffusers_forward(diffusers_with_lora(base_sd, out))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert (want - diffusers_forward(diffusers_transformer(base_sd))).abs().max() > 0.1


def test_peft_dora_file_matches_diffusers_loader(tmp_path, base_sd):
    """A diffusers DoRA file (lora_magnitude_vector): wan's merge equals diffusers/PEFT's own loader."""
    src = kohya_file(tmp_path / "src.safetensors", base_sd, ranks=(4,), alphas=(4.0,))
    out = lora_convert.convert_lora(src, tmp_path / "d.safetensors", "diffusers").path
    tensors, g = load_file(out), torch.Generator().manual_seed(7)
    for key in [k for k in tensors if k.endswith(".lora_B.weight")]:
        stem = key[: -len(".lora_B.weight")]
        tensors[stem + ".lora_magnitude_vector"] = torch.rand(tensors[key].shape[0], generator=g) + 0.5
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["lora_adapter_metadata"])
    config["transformer.use_dora"] = True
    meta["lora_adapter_metadata"] = json.dumps(config)
    dora = tmp_path / "dora.safetensors"
    save_file(tensors, str(dora), metadata=meta)
    merged = LoraMerge([dora])({k: v.clone() for k, v in base_sd.items()})
    want = diffusers_forward(diffusers_transformer(merged))
    got = diffusers_forward(diffusers_with_lora(base_sd, dora))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------------


def test_combined_lora_is_the_exact_sum(tmp_path, base_sd):
    a = kohya_file(tmp_path / "a.safetensors", base_sd, ranks=(4,), alphas=(2.0,), seed=1)
    b = kohya_file(tmp_path / "b.safetensors", base_sd, BLOCKS[:6], ranks=(2,), alphas=(8.0,), seed=2)
    specs = [LoraSpec(a, 0.7), LoraSpec(b, -1.3, exclude="ffn")]
    out, ranks = lora_convert.combine_loras(specs, tmp_path / "ab.safetensors")
    assert ranks["blocks.0.self_attn.q"] == 6 and ranks["blocks.1.ffn.2"] == 4
    want = LoraMerge(specs)({k: v.clone() for k, v in base_sd.items()})
    got = LoraMerge([out])({k: v.clone() for k, v in base_sd.items()})
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6)


def rename(layout, sd):
    if layout == "comfyui_short":  # the other ComfyUI prefix
        return {"diffusion_model." + k: v for k, v in sd.items()}
    return dit_state_dict_to(layout, sd)


@pytest.mark.parametrize("layout", ["official", "comfyui", "comfyui_short", "diffusers"])
def test_merge_into_dit_keeps_layout_and_dtype(layout, tmp_path, base_sd):
    dit = tmp_path / f"dit_{layout}.safetensors"
    stored = {k: v.to(torch.bfloat16) for k, v in rename(layout, base_sd).items()}
    save_file(stored, str(dit))
    lora = kohya_file(tmp_path / "l.safetensors", base_sd)
    out, reports = lora_merge.merge_into_dit(dit, [LoraSpec(lora, 0.5)], tmp_path / "merged.safetensors")
    written = load_file(out)
    assert written.keys() == stored.keys() and all(v.dtype == torch.bfloat16 for v in written.values())
    official = LoraMerge([LoraSpec(lora, 0.5)])({k: v.to(torch.bfloat16) for k, v in base_sd.items()})
    want = rename(layout, official)
    for k in want:  # float32 merge, one rounding to bfloat16
        assert torch.equal(written[k], want[k]), k
    assert len(reports[0].merged) == len(BLOCKS)
    with pytest.raises(InputError, match="exists"):
        lora_merge.merge_into_dit(dit, [lora], out)


def test_merge_into_dit_quantized(tmp_path, base_sd):
    from wan_kernel.models.dit_loading import load_dit

    quantizer = plugin_or_skip("quantization", "fp8_scaled")
    lora = kohya_file(tmp_path / "l.safetensors", base_sd)
    out, _ = lora_merge.merge_into_dit(T2V, [lora], tmp_path / "q.safetensors", quantizer=quantizer)
    written = load_file(out)
    assert written["blocks.0.ffn.0.weight"].dtype == torch.float8_e4m3fn
    at_load = load_dit(T2V, quant=quantizer, state_dict_transform=LoraMerge([lora])).state_dict()
    for k, v in at_load.items():
        assert torch.equal(written[k].float(), v.float()), k


def test_merge_then_generate_equals_lora_at_load(tmp_path):
    """The demo pipeline on a DiT file: --lora_weight at load time == generating with the merged file."""
    from wan_kernel.demo import DemoModels, build_demo_dit
    from wan_kernel.models.dit_loading import load_dit
    from wan_kernel.pipelines.generate import GenerateConfig, GenerationPipeline

    dit_file = tmp_path / "demo_dit.safetensors"
    from wan_kernel.plugins import resolve

    save_file(build_demo_dit(resolve("attention", "sdpa")).state_dict(), str(dit_file))

    class DemoWithDiTFile(DemoModels):
        def __init__(self, path):
            self.path = path

        def load_dit(self, *, device, dtype, attention, quant, state_dict_transform=None):
            return load_dit(
                self.path, device=device, attention=attention, state_dict_transform=state_dict_transform
            )

    base_sd = load_file(dit_file)
    lora = kohya_file(tmp_path / "l.safetensors", base_sd)
    merged_file, _ = lora_merge.merge_into_dit(
        dit_file, [LoraSpec(lora, 0.8)], tmp_path / "merged.safetensors"
    )
    common = {
        "prompt": "a fox", "video_size": (32, 32), "video_length": 5, "infer_steps": 2, "seed": 3,
        "device": "cpu", "output_type": "latent", "save_path": str(tmp_path / "out"), "flow_shift": 3.0,
    }  # fmt: skip
    with_lora = GenerateConfig(lora_weights=[str(lora)], lora_multipliers=[0.8], **common)
    (a,) = GenerationPipeline(with_lora, models=DemoWithDiTFile(dit_file)).run()
    (b,) = GenerationPipeline(GenerateConfig(**common), models=DemoWithDiTFile(merged_file)).run()
    torch.testing.assert_close(a.latent, b.latent, atol=1e-6, rtol=1e-6)
    merged = load_file(merged_file)
    assert not torch.equal(merged["blocks.0.ffn.0.weight"], base_sd["blocks.0.ffn.0.weight"])


# --------------------------------------------------------------------------------------------
# info, resize, ema
# --------------------------------------------------------------------------------------------


def test_info_reports_layout_ranks_fit_and_hashes(tmp_path, base_sd):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(40):  # a 14B i2v LoRA's shapes, on a few modules
        for m in ("self_attn_q", "cross_attn_k_img"):
            tensors[f"lora_unet_blocks_{i}_{m}.lora_down.weight"] = torch.randn(8, 5120, generator=g).to(
                torch.bfloat16
            )
            tensors[f"lora_unet_blocks_{i}_{m}.lora_up.weight"] = torch.zeros(5120, 8, dtype=torch.bfloat16)
            tensors[f"lora_unet_blocks_{i}_{m}.alpha"] = torch.tensor(4.0)
    path = tmp_path / "i2v14b.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_dim": "8", "modelspec.architecture": "wan2.1/lora"})
    info = lora_info.lora_info(path)
    assert info["layout"] == "kohya" and info["modules"] == 80 and info["tensors"] == 240
    assert info["rank_alpha"] == {"rank": 8, "alpha": 4.0, "uniform": True}
    assert info["blocks"] == list(range(40))
    assert info["fits"]["size"] == "14B" and info["fits"]["model_type"] == "i2v or flf2v"
    assert info["training_metadata"] == {"ss_network_dim": "8"}
    assert info["modelspec"] == {"modelspec.architecture": "wan2.1/lora"}
    assert info["hashes"]["sshs_model_hash"] == kohya_hashes(load_file(path), {"ss_network_dim": "8"})[0]
    text = lora_info.format_info(info)
    assert "blocks:   0-39" in text and "14B" in text and "rank:     8, alpha 4.0" in text


def test_resize_keeps_exact_deltas_at_full_rank_and_reports_energy(tmp_path, base_sd):
    src = kohya_file(tmp_path / "src.safetensors", base_sd, ranks=(4,), alphas=(2.0,))
    same, energy = lora_resize.resize_lora(src, tmp_path / "r4.safetensors", 4)
    assert_same_deltas(src, same, rel=1e-5)
    assert all(abs(e - 1.0) < 1e-6 for e in energy.values())
    small, energy = lora_resize.resize_lora(src, tmp_path / "r1.safetensors", 1)
    assert all(0 < e < 1 for e in energy.values())
    for target, module in read_lora(small).by_official_path.items():
        assert module.rank == 1
        # the rank-1 delta is the best rank-1 approximation: its error is the dropped energy
        full = deltas(src)[target]
        err = (full - module.product().double() * module.scale).pow(2).sum() / full.pow(2).sum()
        assert abs(float(err) - (1 - energy[target])) < 1e-4


def test_ema_follows_the_seed_script(tmp_path, base_sd):
    paths = [kohya_file(tmp_path / f"s{i}.safetensors", base_sd, seed=i) for i in range(3)]
    for i, p in enumerate(paths):  # modification times out of name order: sorted by mtime
        os.utime(p, (1000 + 10 * (2 - i), 1000 + 10 * (2 - i)))
    out = lora_ema.ema_loras(paths, tmp_path / "ema.safetensors", beta=0.9, beta2=0.5)
    s = [load_file(p) for p in reversed(paths)]  # oldest first
    key = "lora_unet_blocks_0_self_attn_q.lora_down.weight"
    want = (s[0][key] * 0.9 + s[1][key] * 0.1) * 0.5 + s[2][key] * 0.5
    torch.testing.assert_close(load_file(out)[key], want)
    power = lora_ema.ema_loras(paths, tmp_path / "p.safetensors", sigma_rel=0.2, sort=False)
    gamma = lora_ema.sigma_rel_to_gamma(0.2)
    b2 = 0.5 ** (gamma + 1)  # t = 2 (the first later file has t = 1, beta 0: it replaces the first)
    s = [load_file(p) for p in paths]
    torch.testing.assert_close(load_file(power)[key], s[1][key] * b2 + s[2][key] * (1 - b2))


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def wan(*args):
    from wan_cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_cli_commands_and_clean_errors(tmp_path, base_sd):
    src = kohya_file(tmp_path / "src.safetensors", base_sd)
    r = wan("lora", "convert", "--input", src, "--output", tmp_path / "c.safetensors", "--target", "other")
    assert r.exit_code == 0 and "comfyui layout" in r.output
    r = wan("lora", "convert", "--input", src, "--output", tmp_path / "c.safetensors", "--target", "other")
    assert (
        r.exit_code == 1
        and "error:" in r.output
        and "--overwrite" in r.output
        and "Traceback" not in r.output
    )
    r = wan("lora", "info", tmp_path / "c.safetensors", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["layout"] == "comfyui"
    r = wan(
        "lora", "merge", "--lora_weight", src, tmp_path / "c.safetensors", "--lora_multiplier", "1.0", "-1.0",
        "--output", tmp_path / "zero.safetensors",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    zero = LoraMerge([tmp_path / "zero.safetensors"])({k: v.clone() for k, v in base_sd.items()})
    for k in BLOCKS:
        torch.testing.assert_close(zero[k + ".weight"], base_sd[k + ".weight"], atol=1e-6, rtol=0)
    r = wan("lora", "info", tmp_path / "missing.safetensors")
    assert r.exit_code == 1 and "not found" in r.output
    r = wan("lora", "resize", "--input", src, "--output", tmp_path / "r.safetensors", "--rank", "0")
    assert r.exit_code == 2 and "'--rank': 0 is not in the range x>=1" in r.output  # refused when parsed


def test_generate_save_merged_model_writes_what_lora_merge_writes(tmp_path, base_sd):
    lora = kohya_file(tmp_path / "l.safetensors", base_sd)
    r = wan("run", "generate", "--dit", T2V, "--lora_weight", lora, "--lora_multiplier", "0.5",
            "--save_merged_model", tmp_path / "a.safetensors")  # fmt: skip
    assert r.exit_code == 0, r.output
    r = wan("lora", "merge", "--dit", T2V, "--lora_weight", lora, "--lora_multiplier", "0.5",
            "--output", tmp_path / "b.safetensors")  # fmt: skip
    assert r.exit_code == 0, r.output
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trainer_writer_gives_musubis_layout(tmp_path, base_sd):
    """factors_state_dict + save_lora_file: the kohya keys a musubi-trained LoRA has, hashes included."""
    from wan_kernel.lora import factors_state_dict, save_lora_file

    down, up = torch.randn(4, 64), torch.zeros(64, 4)
    path = save_lora_file(
        tmp_path / "t.safetensors",
        factors_state_dict({"blocks.0.self_attn.q": (down, up, 1.0)}),
        {"ss_a": "1"},
    )
    assert sorted(load_file(path)) == [
        "lora_unet_blocks_0_self_attn_q.alpha",
        "lora_unet_blocks_0_self_attn_q.lora_down.weight",
        "lora_unet_blocks_0_self_attn_q.lora_up.weight",
    ]
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["sshs_model_hash"] == kohya_hashes(load_file(path), {"ss_a": "1"})[0]


def test_info_reads_the_width_from_ffn_only_loras(tmp_path):
    tensors = {
        "diffusion_model.blocks.0.ffn.0.lora_A.weight": torch.zeros(4, 1536),
        "diffusion_model.blocks.0.ffn.0.lora_B.weight": torch.zeros(8960, 4),
    }
    save_file(tensors, str(tmp_path / "ffn.safetensors"))
    assert lora_info.lora_info(tmp_path / "ffn.safetensors")["fits"]["size"] == "1.3B"


def test_generate_lora_strict(tmp_path, base_sd):
    """--lora_strict: the pipeline's DiT build refuses a LoRA with tensors that match nothing."""
    from wan_kernel.pipelines.generate import GenerateConfig, GenerationPipeline

    tensors = load_file(kohya_file(tmp_path / "l.safetensors", base_sd, BLOCKS[:1]))
    tensors["lora_unet_blocks_0_cross_attn_k_img.lora_down.weight"] = torch.zeros(4, 64)
    tensors["lora_unet_blocks_0_cross_attn_k_img.lora_up.weight"] = torch.zeros(64, 4)
    save_file(tensors, str(tmp_path / "i2v.safetensors"))
    common = {
        "dit": str(T2V),
        "t5": str(T2V),
        "device": "cpu",
        "output_type": "latent",
        "lora_weights": [str(tmp_path / "i2v.safetensors")],
    }
    with pytest.raises(InputError, match=r"2 tensor\(s\) of the LoRA match nothing.*k_img"):
        GenerationPipeline(GenerateConfig(lora_strict=True, **common)).build_dit()
    lines: list[str] = []
    with pytest.warns(UserWarning, match="k_img"):
        GenerationPipeline(GenerateConfig(**common), log=lines.append).build_dit()
    assert any("2 tensor(s) not merged" in line for line in lines)

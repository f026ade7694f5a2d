"""Cache file names, tensor names and metadata (the seed's), atomic writes, finding cache pairs."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from wan_kernel.dataset import cache_files as cf
from wan_kernel.errors import OutputError
from wan_kernel.testing.bad_input import DEAD_PID, killed_run_temporary, leftover_temporaries


def test_names_round_trip():
    assert cf.latent_cache_name("photo", 1920, 1080) == "photo_1920x1080_wan.safetensors"
    assert (
        cf.latent_cache_name("clip", 640, 360, start=25, frames=45)
        == "clip_00025-045_0640x0360_wan.safetensors"
    )
    assert cf.text_cache_name("clip") == "clip_wan_te.safetensors"
    parsed = cf.parse_latent_cache_name("dir/my_clip_2_00025-045_0640x0360_wan.safetensors")
    assert parsed == cf.LatentCacheName("my_clip_2", 640, 360, 25, 45)
    assert parsed.filename == "my_clip_2_00025-045_0640x0360_wan.safetensors"
    assert cf.parse_latent_cache_name("a_b_0032x0016_wan.safetensors") == cf.LatentCacheName("a_b", 32, 16)
    assert cf.parse_latent_cache_name("a_wan_te.safetensors") is None
    assert cf.parse_latent_cache_name("a_0032x0016_hv.safetensors") is None  # another architecture's
    assert cf.text_cache_path_for(Path("c/x_00001-005_0048x0032_wan.safetensors")) == Path(
        "c/x_wan_te.safetensors"
    )


def test_tensor_keys():
    latents = torch.zeros(16, 21, 60, 104, dtype=torch.bfloat16)
    assert cf.latent_key(latents) == "latents_21x60x104_bfloat16"
    assert cf.latent_key(latents, name="latents_image") == "latents_image_21x60x104_bfloat16"
    assert cf.strip_key("latents_21x60x104_bfloat16") == "latents"
    assert cf.strip_key("latents_image_21x60x104_bfloat16") == "latents_image"
    assert cf.strip_key("clip_float16") == "clip"
    assert cf.strip_key("varlen_t5_bfloat16") == "t5"


def test_latent_cache_contents(tmp_path):
    latents = torch.randn(16, 2, 4, 6).to(torch.bfloat16)
    y = torch.randn(20, 2, 4, 6)
    clip = torch.randn(257, 1280, dtype=torch.float16)
    path = cf.write_latent_cache(
        tmp_path / "v_00000-005_0048x0032_wan.safetensors",
        latents,
        width=48,
        height=32,
        frame_count=5,
        image_latents=y,
        clip=clip,
    )
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == [
            "clip_bfloat16",
            "latents_2x4x6_bfloat16",
            "latents_image_2x4x6_bfloat16",
        ]
        assert handle.metadata() == {
            "architecture": "wan",
            "format_version": "1.0.1",
            "width": "48",
            "height": "32",
            "frame_count": "5",
        }
    read = cf.read_latent_cache(path)
    assert torch.equal(read["latents"], latents) and torch.equal(read["latents_image"], y.to(torch.bfloat16))
    assert cf.latent_cache_complete(path, image_conditioning=True, clip=True)
    assert list(tmp_path.iterdir()) == [path]  # no temporary left


def test_text_cache_keeps_other_encoders_and_replaces_t5(tmp_path):
    path = tmp_path / "a_wan_te.safetensors"
    save_file({"varlen_t5_float32": torch.zeros(3, 8), "other_float32": torch.ones(2)}, path)
    cf.write_text_cache(path, torch.ones(5, 8, dtype=torch.bfloat16), caption="a cat")
    tensors, metadata = cf.read_cache(path)
    assert sorted(tensors) == ["other", "t5"] and tensors["t5"].shape == (5, 8)
    assert metadata == {"architecture": "wan", "caption1": "a cat", "format_version": "1.0.1"}
    assert cf.text_cache_complete(path, caption="a cat") and not cf.text_cache_complete(path, caption="a dog")


def test_non_finite_is_refused_and_nothing_written(tmp_path):
    bad = torch.zeros(16, 1, 2, 2)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(cf.NonFiniteError, match="photo.png: the latent has 1 non-finite"):
        cf.write_latent_cache(
            tmp_path / "x_0016x0016_wan.safetensors", bad, width=16, height=16, item="photo.png"
        )
    with pytest.raises(cf.NonFiniteError, match="text embedding"):
        cf.write_text_cache(tmp_path / "x_wan_te.safetensors", torch.full((2, 4), float("nan")), caption="x")
    assert not list(tmp_path.iterdir())


def _full_disk(tensors, name, metadata=None):
    Path(name).write_bytes(b"half a file")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("kind", ["latent", "text"])
def test_a_full_disk_is_an_output_error_and_leaves_nothing(tmp_path, monkeypatch, kind):
    import safetensors.torch

    target = tmp_path / ("x_0016x0016_wan.safetensors" if kind == "latent" else "x_wan_te.safetensors")
    if kind == "text":
        cf.write_text_cache(target, torch.zeros(2, 4), caption="old")  # an older cache stays whole
    monkeypatch.setattr(safetensors.torch, "save_file", _full_disk)
    with pytest.raises(OutputError, match="disk is full") as info:
        if kind == "latent":
            cf.write_latent_cache(target, torch.zeros(16, 1, 2, 2), width=16, height=16)
        else:
            cf.write_text_cache(target, torch.ones(2, 4), caption="new")
    assert str(target) in str(info.value)
    assert not leftover_temporaries(tmp_path)
    if kind == "latent":
        assert not list(tmp_path.iterdir())
    else:
        monkeypatch.undo()
        assert cf.text_cache_complete(target, caption="old")


def test_a_killed_runs_temporary_is_removed_by_the_next_write(tmp_path):
    stale = killed_run_temporary(tmp_path / "a_0016x0016_wan.safetensors")
    cf.write_latent_cache(
        tmp_path / "b_0016x0016_wan.safetensors", torch.zeros(16, 1, 2, 2), width=16, height=16
    )
    assert not stale.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["b_0016x0016_wan.safetensors"]


def test_partials_are_never_taken_for_caches(tmp_path):
    killed_run_temporary(tmp_path / "a_0016x0016_wan.safetensors")
    with_live_writer = killed_run_temporary(tmp_path / "z_0016x0016_wan.safetensors")
    alive = with_live_writer.with_name(with_live_writer.name.replace(f"-{DEAD_PID}-", f"-{os.getpid()}-"))
    with_live_writer.rename(alive)  # a concurrent run still writing this one
    cf.write_latent_cache(
        tmp_path / "b_0016x0016_wan.safetensors", torch.zeros(16, 1, 2, 2), width=16, height=16
    )
    cf.write_text_cache(tmp_path / "b_wan_te.safetensors", torch.zeros(2, 4), caption="b")
    cf.write_latent_cache(
        tmp_path / "c_0016x0016_wan.safetensors", torch.zeros(16, 1, 2, 2), width=16, height=16
    )
    found, orphans = cf.find_cached_items(tmp_path)
    assert [i.latent_path.name for i in found] == ["b_0016x0016_wan.safetensors"]
    assert found[0].text_path.name == "b_wan_te.safetensors" and found[0].name.base == "b"
    assert [p.name for p in orphans] == ["c_0016x0016_wan.safetensors"]
    killed_run_temporary(tmp_path / "d_0016x0016_wan.safetensors")
    assert cf.remove_partials(tmp_path) == 1
    assert alive.exists() and leftover_temporaries(tmp_path) == [alive]
    assert not cf.latent_cache_complete(tmp_path / "missing_0016x0016_wan.safetensors")
    (tmp_path / "junk_0016x0016_wan.safetensors").write_bytes(b"not safetensors")
    assert not cf.latent_cache_complete(tmp_path / "junk_0016x0016_wan.safetensors")

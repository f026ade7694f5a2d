"""Input images (EXIF, alpha) and the atomic mp4 / PNG / latent writers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from wan_kernel.errors import InputError, OutputError
from wan_kernel.pipelines import media


def _rgb(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack(
        [x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), np.full_like(x, 60)], -1
    ).astype(np.uint8)


def test_exif_orientation_is_applied(tmp_path):
    pixels = _rgb(40, 20)  # landscape as stored
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    upright = media.read_image(path)
    assert upright.size == (20, 40)  # displayed portrait


@pytest.mark.parametrize("background, value", [("white", 255), ("black", 0)])
def test_transparency_is_flattened_onto_the_background(tmp_path, background, value):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red under...
    rgba[:4, :, 3] = 255  # ...opaque top half, transparent bottom half
    rgba[4:, :, 3] = 0
    path = tmp_path / "cutout.png"
    Image.fromarray(rgba, "RGBA").save(path)
    rgb = np.asarray(media.read_image(path, background=background))
    assert rgb.shape == (8, 8, 3)
    assert (rgb[:4, :, 0] == 200).all()
    assert (rgb[4:] == value).all()


def test_palette_transparency_and_greyscale_become_rgb(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.info["transparency"] = 1
    path = tmp_path / "p.png"
    palette.save(path, transparency=1)
    assert (np.asarray(media.read_image(path)) == 255).all()
    grey = tmp_path / "g.png"
    Image.new("L", (4, 4), 77).save(grey)
    assert (np.asarray(media.read_image(grey)) == 77).all()


def test_unreadable_and_missing_images_are_input_errors(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="cannot read image"):
        media.read_image(bad)
    with pytest.raises(InputError, match="image not found"):
        media.read_image(tmp_path / "nope.png")


def test_image_tensor_matches_to_tensor_convention():
    image = Image.fromarray(_rgb(6, 4))
    tensor = media.image_to_tensor(image)
    assert tensor.shape == (3, 4, 6)
    expected = torch.from_numpy(_rgb(6, 4)).permute(2, 0, 1).float() / 255 * 2 - 1
    assert torch.allclose(tensor, expected, atol=1e-6)


def test_mp4_round_trip_keeps_frames_size_fps_and_metadata(tmp_path):
    video = torch.linspace(-1, 1, 3 * 9 * 32 * 48).reshape(3, 9, 32, 48)
    frames = media.video_to_uint8(video)
    assert frames.shape == (9, 32, 48, 3) and frames.dtype == np.uint8
    meta = {"prompt": "a fox — 狐", "seed": 7, "fps": 12}
    path = media.write_video(tmp_path / "v.mp4", frames, fps=12, metadata=meta)
    decoded, fps, settings = media.read_video(path)
    assert decoded.shape == (9, 32, 48, 3)
    assert fps == 12
    assert settings == meta
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 4  # lossy but close
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]  # no temporary left behind


def test_failed_write_leaves_nothing_at_the_path(tmp_path):
    target = tmp_path / "out.mp4"
    with pytest.raises(ValueError):
        media.write_video(target, np.zeros((2, 8, 8), np.uint8))  # wrong shape
    with pytest.raises(InputError, match="even sizes"):
        media.write_video(target, np.zeros((2, 7, 8, 3), np.uint8))
    with pytest.raises(RuntimeError):
        with media.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_png_frames_folder_and_single_image(tmp_path):
    frames = media.video_to_uint8(torch.zeros(3, 5, 16, 16))
    folder = media.write_frames(tmp_path / "clip", frames, metadata={"seed": 3})
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"frame_{i:05d}.png" for i in range(5)]
    assert media.read_png_settings(folder / names[0]) == {"seed": 3}
    single = media.write_image(tmp_path / "one.png", frames[0], metadata={"prompt": "x"})
    assert media.read_png_settings(single)["prompt"] == "x"
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    beside = media.write_frames(tmp_path / "busy", frames)  # a taken folder is never written into
    assert beside == tmp_path / "busy_1" and len(list(beside.iterdir())) == 5
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    with pytest.raises(OutputError, match="not empty"):
        with media.atomic_path(tmp_path / "busy", directory=True) as tmp:
            (tmp / "x.png").write_bytes(b"x")


def test_latent_round_trip_with_metadata(tmp_path):
    latent = torch.randn(16, 3, 4, 6)
    path = media.save_latent(
        tmp_path / "l.safetensors", latent, metadata={"seed": 5, "prompt": "p", "height": 32}
    )
    loaded, meta = media.load_latent(path)
    assert torch.equal(loaded, latent)
    assert meta == {"seed": 5, "prompt": "p", "height": 32}


def test_latent_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        media.load_latent(tmp_path / "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 20)
    with pytest.raises(InputError, match="cannot read latent"):
        media.load_latent(junk)
    from safetensors.torch import save_file

    flat = tmp_path / "flat.safetensors"
    save_file({"latent": torch.zeros(4, 4)}, str(flat))
    with pytest.raises(InputError, match="expected a latent"):
        media.load_latent(flat)


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """mkstemp makes owner-only files; the finished output must be readable like any other file."""
    import os

    mask = os.umask(0o022)
    try:
        with media.atomic_path(tmp_path / "out.mp4") as tmp:
            tmp.write_bytes(b"x")
        with media.atomic_path(tmp_path / "frames", directory=True) as tmp:
            (tmp / "0.png").write_bytes(b"x")
    finally:
        os.umask(mask)
    assert (tmp_path / "out.mp4").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "frames").stat().st_mode & 0o777 == 0o755

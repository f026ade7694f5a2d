"""Buckets, resizing, frame extraction, fps resampling and video reading against worked examples."""

from __future__ import annotations

import numpy as np
import pytest

from wan_kernel.dataset.buckets import BucketSelector, resize_to_bucket
from wan_kernel.dataset.frames import extract_clips, resampled_indices
from wan_kernel.dataset.media import MediaError, read_video
from wan_kernel.pipelines.media import write_image, write_video

# --------------------------------------------------------------------------------------------
# Buckets
# --------------------------------------------------------------------------------------------


def test_bucket_table_keeps_the_area_in_16_pixel_steps():
    selector = BucketSelector((960, 544), enable_bucket=True)
    area = 960 * 544
    assert (960, 544) in selector.buckets and (544, 960) in selector.buckets
    assert (720, 720) in selector.buckets  # sqrt(522240) = 722.6 -> w = 720, h = floor16(725) = 720
    for w, h in selector.buckets:
        assert w % 16 == 0 and h % 16 == 0 and (h, w) in selector.buckets
        assert w * h <= area and w * h > area * 0.9
    assert min(w for w, _ in selector.buckets) == 352  # floor16(722 / 2)


@pytest.mark.parametrize(
    "size, bucket",
    [
        ((1920, 1080), (960, 544)),  # 16:9 -> the nearest aspect ratio, 1.7647
        ((1080, 1920), (544, 960)),
        ((1000, 1000), (720, 720)),
        ((640, 480), (832, 624)),  # 4:3 = 1.333: 832/624 = 1.3333
    ],
)
def test_nearest_aspect_ratio(size, bucket):
    assert BucketSelector((960, 544), enable_bucket=True).bucket(*size) == bucket


def test_no_upscale_and_no_buckets():
    selector = BucketSelector((960, 544), enable_bucket=True, no_upscale=True)
    assert selector.bucket(330, 250) == (320, 240)  # small: its own size floored to 16
    assert selector.bucket(1920, 1080) == (960, 544)  # larger than the area: a bucket
    plain = BucketSelector((960, 544))
    assert plain.buckets == ((960, 544),) and plain.bucket(300, 1000) == (960, 544)


def test_resize_scales_to_cover_then_centre_crops():
    from PIL import Image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 100, 3), dtype=np.uint8)  # W 100, H 40
    # enlarge: scale max(64/100, 48/40) = 1.2 -> 120x48 with Lanczos, crop 28 px off each side
    out = resize_to_bucket(image, (64, 48))
    expected = np.asarray(Image.fromarray(image).resize((120, 48), Image.LANCZOS))[:, 28:92]
    assert out.shape == (48, 64, 3) and np.array_equal(out, expected)
    # shrink by 2 (area averaging): each output pixel is the mean of a 2x2 block
    flat = np.repeat(np.repeat(rng.integers(0, 256, (10, 20, 3), dtype=np.uint8), 2, 0), 2, 1)  # [20, 40]
    small = resize_to_bucket(flat, (16, 10))  # scale 0.5 -> 20x10, crop 2 px each side
    assert np.array_equal(small, flat[::2, ::2][:, 2:18])
    assert resize_to_bucket(image, (100, 40)) is image


# --------------------------------------------------------------------------------------------
# Frame extraction
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames, kwargs, clips",
    [
        (30, dict(target_frames=(1, 9, 45), mode="head"), [(0, 1), (0, 9)]),
        (30, dict(target_frames=(9,), mode="chunk"), [(0, 9), (9, 9), (18, 9)]),
        (27, dict(target_frames=(9,), mode="chunk"), [(0, 9), (9, 9), (18, 9)]),
        (26, dict(target_frames=(9,), mode="chunk"), [(0, 9), (9, 9)]),
        (20, dict(target_frames=(9,), mode="slide", frame_stride=5), [(0, 9), (5, 9), (10, 9)]),
        (30, dict(target_frames=(9,), mode="uniform", frame_sample=3), [(0, 9), (10, 9), (21, 9)]),
        (30, dict(target_frames=(9,), mode="uniform", frame_sample=1), [(0, 9)]),  # = head
        (10, dict(target_frames=(9,), mode="uniform", frame_sample=4), [(0, 9), (1, 9)]),  # repeats once
        (30, dict(target_frames=(9,), mode="full"), [(0, 29)]),
        (200, dict(target_frames=(9,), mode="full", max_frames=129), [(0, 129)]),
        (100, dict(target_frames=(9,), mode="full", max_frames=64), [(0, 61)]),
        (5, dict(target_frames=(9,), mode="head"), []),
    ],
)
def test_extract_clips(frames, kwargs, clips):
    assert extract_clips(frames, **kwargs) == clips


def test_source_fps_resampling():
    kept = resampled_indices(30, 30.0)  # 30 -> 16 fps: one second keeps 16 frames
    assert kept == [0, 2, 4, 6, 8, 10, 12, 14, 15, 17, 19, 21, 23, 25, 27, 29]
    assert resampled_indices(6, 24.0) == [0, 2, 3, 5]  # 24 -> 16: two of every three
    assert resampled_indices(5, 16.0) == [0, 1, 2, 3, 4]
    assert resampled_indices(4, 8.0) == [0, 1, 2, 3]  # slower than 16 fps: nothing duplicated
    assert resampled_indices(7, None) == list(range(7))


# --------------------------------------------------------------------------------------------
# Reading videos
# --------------------------------------------------------------------------------------------


def _video(path, count=20, size=(32, 48)):
    frames = np.zeros((count, *size, 3), np.uint8)
    for i in range(count):
        frames[i, :, :, 0] = i * 12  # frame i is recognisable by its red level
    write_video(path, frames, fps=30)
    return frames


def test_read_video_counts_resamples_and_stops(tmp_path):
    _video(tmp_path / "v.mp4")
    whole = read_video(tmp_path / "v.mp4")
    assert whole.count == 20 and whole.frames.shape == (20, 32, 48, 3) and whole.complete
    assert whole.size == (48, 32) and whole.fps == pytest.approx(30)
    red = whole.frames[:, 16, 24, 0].astype(int)
    assert np.all(np.abs(red - np.arange(20) * 12) <= 3)
    resampled = read_video(tmp_path / "v.mp4", source_fps=30.0)
    assert resampled.count == len(resampled_indices(20, 30.0)) == 11
    assert np.array_equal(resampled.frames, whole.frames[resampled_indices(20, 30.0)])
    head = read_video(tmp_path / "v.mp4", limit=5)
    assert head.count == 5 and not head.complete and np.array_equal(head.frames, whole.frames[:5])
    counted = read_video(tmp_path / "v.mp4", pixels=False)
    assert counted.count == 20 and counted.frames.shape[0] == 1
    # frames are fitted (to their bucket) as they are decoded; the size reported is the source's
    fitted = read_video(tmp_path / "v.mp4", fit=lambda frame: resize_to_bucket(frame, (16, 16)))
    assert fitted.frames.shape == (20, 16, 16, 3) and fitted.size == (48, 32)
    assert np.array_equal(fitted.frames[3], resize_to_bucket(whole.frames[3], (16, 16)))


def test_folder_of_images_is_a_video(tmp_path):
    folder = tmp_path / "clip"
    for i in range(6):
        write_image(folder / f"f{i:03d}.png", np.full((16, 24, 3), i * 40, np.uint8))
    video = read_video(folder)
    assert video.count == 6 and video.frames.shape == (6, 16, 24, 3) and video.fps is None
    assert [int(f[0, 0, 0]) for f in video.frames] == [0, 40, 80, 120, 160, 200]
    assert read_video(folder, source_fps=24.0).count == 4


def test_unreadable_video(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    with pytest.raises(MediaError, match="bad.mp4"):
        read_video(tmp_path / "bad.mp4")


def test_rotation_metadata_is_applied(tmp_path):
    """A phone's portrait clip: landscape pixels plus "turn 90 degrees clockwise" in the container."""
    import av

    frames = np.zeros((3, 32, 48, 3), np.uint8)
    frames[:, :8, :8] = 255  # white top-left corner
    path = tmp_path / "rot.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        if not hasattr(stream, "set_display_rotation"):
            pytest.skip("this PyAV cannot write a display matrix")
        stream.set_display_rotation(-90)  # counter-clockwise degrees: -90 = a quarter turn clockwise
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    video = read_video(path)
    assert video.size == (32, 48) and video.count == 3  # portrait
    assert video.frames[0, :8, -8:].mean() > 200  # the top-left corner is now top-right
    assert video.frames[0, -8:, :8].mean() < 50

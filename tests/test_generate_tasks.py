"""The task table (defaults, task from weights) and image conditioning (i2v, flf2v, i2v + end image)."""

from __future__ import annotations

import pytest
import torch

from wan_kernel.errors import InputError
from wan_kernel.pipelines.conditioning import (
    crop_to_aspect,
    encode_conditioning,
    frame_mask,
    latent_size_for_area,
)
from wan_kernel.pipelines.tasks import DEFAULT_NEGATIVE_PROMPT, TASKS, select_task


def test_official_defaults():
    assert TASKS["t2v-1.3B"].steps == 50 and TASKS["i2v-14B"].steps == 40 and TASKS["flf2v-14B"].steps == 40
    assert TASKS["i2v-14B"].default_flow_shift(480, 832) == 3.0
    assert TASKS["i2v-14B"].default_flow_shift(832, 480) == 3.0
    assert TASKS["i2v-14B"].default_flow_shift(720, 1280) == 5.0
    assert TASKS["t2v-14B"].default_flow_shift(480, 832) == 5.0
    assert TASKS["t2i-14B"].frames == 1
    assert DEFAULT_NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态") and DEFAULT_NEGATIVE_PROMPT.endswith(
        "倒着走"
    )
    assert TASKS["flf2v-14B"].negative_prompt == "镜头切换，" + DEFAULT_NEGATIVE_PROMPT


def test_task_comes_from_the_weights_and_task_only_confirms_it():
    assert select_task("t2v", 1536).name == "t2v-1.3B"
    assert select_task("t2v", 5120).name == "t2v-14B"
    assert select_task("t2v", 5120, "t2i-14B").name == "t2i-14B"
    assert select_task("i2v", 5120).name == "i2v-14B"
    assert select_task("flf2v", 5120).name == "flf2v-14B"
    with pytest.raises(InputError, match="the --dit file is an i2v 14B DiT"):
        select_task("i2v", 5120, "t2v-14B")
    with pytest.raises(InputError, match="width 5120"):
        select_task("t2v", 1536, "t2v-14B")
    tiny = select_task("i2v", 64)
    assert tiny.mode == "i2v" and tiny.steps == 40 and "custom" in tiny.name


def test_i2v_size_keeps_the_area_and_the_aspect_ratio():
    assert latent_size_for_area(64, 80, 3840) == (6, 8)  # the i2v_cond fixture
    lat_h, lat_w = latent_size_for_area(1080, 1920, 480 * 832)
    assert (lat_h, lat_w) == (58, 104) and lat_h % 2 == 0 and lat_w % 2 == 0
    with pytest.raises(InputError, match="too small"):
        latent_size_for_area(100, 100, 100)


def test_masks_mark_the_given_frames():
    msk = frame_mask(9, 2, 2)  # [4, 3, 2, 2]
    assert msk.shape == (4, 3, 2, 2)
    assert msk[:, 0].eq(1).all() and msk[:, 1:].eq(0).all()
    flf = frame_mask(9, 2, 2, last_frame=True)
    assert flf[:, 0].eq(1).all() and flf[:, 1].eq(0).all()
    assert (
        flf[:3, 2].eq(0).all() and flf[3, 2].eq(1).all()
    )  # channel 3 of the last latent frame = video frame 8


class FrameVAE:
    """encode: [B, 3, F, H, W] -> [B, 16, 1 + (F-1)/4, H/8, W/8], each latent frame holding the mean
    of its first pixel frame."""

    def __init__(self):
        self.inputs = []

    def encode(self, video):
        self.inputs.append(video)
        b, _, f, h, w = video.shape
        t = 1 + (f - 1) // 4
        means = torch.stack(
            [video[:, :, 0 if i == 0 else 4 * i].mean(dim=(1, 2, 3)) for i in range(t)], dim=1
        )
        return means[:, None, :, None, None].expand(b, 16, t, h // 8, w // 8).clone()


def _image(value: float, h: int = 64, w: int = 80) -> torch.Tensor:
    return torch.full((3, h, w), value)


def test_i2v_conditioning_layout():
    vae = FrameVAE()
    cond = encode_conditioning(vae, _image(0.5), frames=9, max_area=3840, clip_fea=torch.zeros(1, 257, 1280))
    assert cond.y.shape == (20, 3, 6, 8) and cond.latent_frames == 3 and (cond.height, cond.width) == (48, 64)
    (video,) = vae.inputs
    assert video.shape == (1, 3, 9, 48, 64)
    assert torch.allclose(video[0, :, 0], torch.tensor(0.5)) and video[0, :, 1:].eq(0).all()


def test_flf2v_conditioning_encodes_first_and_last_frame_together():
    vae = FrameVAE()
    end = _image(-0.5, 40, 100)  # other aspect ratio: centre-cropped to the start image's
    cond = encode_conditioning(
        vae, _image(0.5), frames=9, max_area=3840, end=end, mode="flf2v", clip_fea=torch.zeros(2, 257, 1280)
    )
    (video,) = vae.inputs
    assert video.shape == (1, 3, 9, 48, 64)
    assert torch.allclose(video[0, :, -1], torch.tensor(-0.5)) and video[0, :, 1:-1].eq(0).all()
    assert cond.y[3, -1].eq(1).all() and cond.y[:3, -1].eq(0).all()
    with pytest.raises(InputError, match="needs an end image"):
        encode_conditioning(
            vae, _image(0.5), frames=9, max_area=3840, mode="flf2v", clip_fea=torch.zeros(2, 257, 1280)
        )


def test_i2v_with_end_image_appends_one_latent_frame():
    vae = FrameVAE()
    cond = encode_conditioning(
        vae, _image(0.5), frames=9, max_area=3840, end=_image(-0.25), clip_fea=torch.zeros(1, 257, 1280)
    )
    assert cond.latent_frames == 4 and cond.y.shape == (20, 4, 6, 8)
    assert cond.y[:4, -1].eq(1).all()  # the extra frame is fully given
    assert torch.allclose(cond.y[4:, -1], torch.tensor(-0.25))
    assert [v.shape[2] for v in vae.inputs] == [9, 1]  # end image encoded on its own


def test_clip_is_required_without_features():
    with pytest.raises(InputError, match="--clip"):
        encode_conditioning(FrameVAE(), _image(0.5), frames=5, max_area=3840)


def test_crop_to_aspect():
    assert crop_to_aspect(torch.zeros(3, 40, 100), 64, 80).shape == (3, 40, 50)
    assert crop_to_aspect(torch.zeros(3, 100, 40), 64, 80).shape == (3, 32, 40)
    assert crop_to_aspect(torch.zeros(3, 64, 80), 64, 80).shape == (3, 64, 80)

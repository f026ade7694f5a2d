"""Image conditioning for image-to-video and first-last-frame-to-video (official ``WanI2V`` /
``WanFLF2V.generate``).

The DiT of an i2v/flf2v model takes, besides the noisy latent, ``y`` ``[20, T, h, w]``: a
4-channel frame mask (which video frames are given) and the VAE latent of the given frames with
zeros elsewhere; and CLIP features of the given image(s) ``[N, 257, 1280]``.

- Size: the requested area ``H*W`` is kept, the aspect ratio comes from the start image:
  ``lat_h = round(sqrt(area * h0/w0) // 8 // 2 * 2)``, ``lat_w = round(sqrt(area * w0/h0) // 8 // 2 * 2)``.
- Mask: channel ``c`` of latent frame ``j`` is the mask of video frame ``4j + c - 3`` (video
  frame 0 repeated four times for ``j = 0``): latent frame 0 all ones; for flf2v also channel 3 of
  the last latent frame (the last video frame).
- VAE input: the start image resized bicubically (``align_corners=False``, no antialias) to
  ``(8 lat_h, 8 lat_w)``, then zero frames (and the resized end image last, for flf2v).
- End image with an i2v model (unofficial, as the seed trainer does it): the end image is encoded
  on its own and appended as one extra latent frame whose mask is all ones; the video comes out
  four frames longer with a noisy tail, hence ``--trim_tail_frames``.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F

from wan_kernel.errors import InputError
from wan_kernel.models.clip import CLIP_MEAN, CLIP_STD
from wan_kernel.models.vae import SPATIAL_STRIDE, TEMPORAL_STRIDE

VAE_STRIDE = (TEMPORAL_STRIDE, SPATIAL_STRIDE, SPATIAL_STRIDE)
PATCH = (1, 2, 2)
CLIP_IMAGE_SIZE = 224


@attrs.frozen
class ImageConditioning:
    """What an image-conditioned DiT needs besides the noise and the text.

    ``y`` ``[4 + 16, T, lat_h, lat_w]``; ``clip_fea`` ``[N, 257, 1280]`` (N = 2 for flf2v);
    ``latent_frames`` is ``T`` (the noise must have that many frames).
    """

    y: torch.Tensor
    clip_fea: torch.Tensor | None
    lat_h: int
    lat_w: int
    latent_frames: int

    @property
    def height(self) -> int:
        return self.lat_h * VAE_STRIDE[1]

    @property
    def width(self) -> int:
        return self.lat_w * VAE_STRIDE[2]


def latent_size_for_area(image_h: int, image_w: int, max_area: int) -> tuple[int, int]:
    """Latent ``(lat_h, lat_w)`` with area ~``max_area`` pixels and the image's aspect ratio.

    Exactly the official rounding (multiples of the 2x2 patch in latent pixels).
    """
    aspect = image_h / image_w
    lat_h = round(math.sqrt(max_area * aspect) // VAE_STRIDE[1] // PATCH[1] * PATCH[1])
    lat_w = round(math.sqrt(max_area / aspect) // VAE_STRIDE[2] // PATCH[2] * PATCH[2])
    if lat_h < PATCH[1] or lat_w < PATCH[2]:
        raise InputError(
            f"the requested area {max_area} px is too small for an image of {image_w}x{image_h}: "
            f"it gives a {lat_w * 8}x{lat_h * 8} video; ask for a larger --video_size"
        )
    return int(lat_h), int(lat_w)


def frame_mask(frames: int, lat_h: int, lat_w: int, *, last_frame: bool = False) -> torch.Tensor:
    """The 4-channel conditioning mask ``[4, 1 + (frames-1)/4, lat_h, lat_w]`` (float32).

    ``last_frame=True`` marks the last video frame as given too (first-last-frame models).
    """
    msk = torch.ones(1, frames, lat_h, lat_w)
    if last_frame:
        msk[:, 1:-1] = 0
    else:
        msk[:, 1:] = 0
    # frame 0 stands for the 4 video frames the first latent frame would cover
    msk = torch.cat([msk[:, 0:1].repeat_interleave(4, dim=1), msk[:, 1:]], dim=1)  # [1, F + 3, h, w]
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)  # [1, T, 4, h, w]
    return msk.transpose(1, 2)[0]  # [4, T, h, w]


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[3, h0, w0]`` -> ``[3, height, width]``, bicubic without antialias (official)."""
    return F.interpolate(image[None].float(), size=(height, width), mode="bicubic", align_corners=False)[0]


def crop_to_aspect(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre-crop ``[3, h, w]`` to the aspect ratio ``height:width`` (used for the end image)."""
    _, h, w = image.shape
    if h * width == w * height:
        return image
    if h * width > w * height:  # too tall
        new_h = max(1, round(w * height / width))
        top = (h - new_h) // 2
        return image[:, top : top + new_h]
    new_w = max(1, round(h * width / height))
    left = (w - new_w) // 2
    return image[:, :, left : left + new_w]


def clip_pixels(images: torch.Tensor, size: int = CLIP_IMAGE_SIZE) -> torch.Tensor:
    """Images ``[N, 3, h, w]`` in [-1, 1] -> CLIP input ``[N, 3, size, size]`` (as ``CLIPModel.visual``).

    Bicubic resize to ``size`` (no crop), back to [0, 1], then the CLIP mean/std normalisation.
    """
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)
    x = x.mul(0.5).add(0.5)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def clip_features(clip, images: torch.Tensor) -> torch.Tensor:
    """CLIP features ``[N, 257, 1280]`` (float32) of images ``[N, 3, h, w]`` in [-1, 1].

    ``clip`` is what ``load_clip_vision`` returns (``clip.features(pixels)``); its input size is
    read from ``clip.image_size`` when it has one (224 for the real model).
    """
    size = int(getattr(clip, "image_size", CLIP_IMAGE_SIZE))
    param = next(iter(clip.parameters()), None) if hasattr(clip, "parameters") else None
    pixels = clip_pixels(images, size)
    if param is not None:
        pixels = pixels.to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        return clip.features(pixels).float()


def encode_conditioning(
    vae,
    start: torch.Tensor,
    *,
    frames: int,
    max_area: int,
    end: torch.Tensor | None = None,
    mode: str = "i2v",
    clip=None,
    clip_fea: torch.Tensor | None = None,
) -> ImageConditioning:
    """Build the image conditioning of one request.

    ``start``/``end`` are images ``[3, h0, w0]`` in [-1, 1] at their own resolution; ``frames`` is
    the video length (``1 + 4k``); ``max_area`` the requested ``H*W``. ``mode`` is ``i2v`` or
    ``flf2v``; with ``end`` and ``mode="i2v"`` the unofficial extra-frame scheme is used.
    ``clip_fea`` (precomputed) or ``clip`` (a model) gives the CLIP features; one of them is
    required. ``vae.encode`` takes ``[B, 3, F, H, W]``.
    """
    if (frames - 1) % VAE_STRIDE[0]:
        raise InputError(f"the video length must be 4n+1 frames, got {frames}")
    if mode == "flf2v" and end is None:
        raise InputError("a first-last-frame (flf2v) model needs an end image: pass --end_image_path")
    if mode == "flf2v" and frames < 2:
        raise InputError("first-last-frame generation needs at least 5 frames")
    _, h0, w0 = start.shape
    lat_h, lat_w = latent_size_for_area(h0, w0, max_area)
    height, width = lat_h * VAE_STRIDE[1], lat_w * VAE_STRIDE[2]
    lat_f = (frames - 1) // VAE_STRIDE[0] + 1

    end_fitted = crop_to_aspect(end, h0, w0) if end is not None else None
    if clip_fea is None:
        if clip is None:
            raise InputError("image-to-video needs the CLIP image encoder: pass --clip")
        images = [start[None]]
        if end is not None and mode == "flf2v":
            images.append(resize_image(end_fitted, h0, w0)[None])
        clip_fea = torch.cat([clip_features(clip, image) for image in images])  # [N, 257, 1280]

    first = resize_image(start, height, width)  # [3, H, W]
    if mode == "flf2v":
        last = resize_image(end_fitted, height, width)
        video = torch.cat([first[:, None], torch.zeros(3, frames - 2, height, width), last[:, None]], dim=1)
        latent = vae.encode(video[None])[0].float().cpu()  # [16, T, h, w]
        msk = frame_mask(frames, lat_h, lat_w, last_frame=True)
    else:
        video = torch.cat([first[:, None], torch.zeros(3, frames - 1, height, width)], dim=1)  # [3, F, H, W]
        latent = vae.encode(video[None])[0].float().cpu()  # [16, T, h, w]
        msk = frame_mask(frames, lat_h, lat_w)
        if end is not None:
            last = resize_image(end_fitted, height, width)
            end_latent = vae.encode(last[:, None][None])[0].float().cpu()  # [16, 1, h, w]
            latent = torch.cat([latent, end_latent], dim=1)
            msk = torch.cat([msk, torch.ones(4, 1, lat_h, lat_w)], dim=1)
            lat_f += 1
    y = torch.cat([msk, latent])  # [20, T, h, w]
    return ImageConditioning(y=y, clip_fea=clip_fea, lat_h=lat_h, lat_w=lat_w, latent_frames=lat_f)


def read_request_images(
    image_path: str, end_image_path: str | None = None, *, background: str = "white"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The start (and end) image of a request as ``[3, h, w]`` tensors in [-1, 1] at their own size.

    :param background: what transparent pixels become (``--image_background``).
    """
    from wan_kernel.pipelines import media

    start = media.image_to_tensor(media.read_image(image_path, background=background))
    end = None
    if end_image_path:
        end = media.image_to_tensor(media.read_image(end_image_path, background=background))
    return start, end


def request_clip_features(
    clip, start: torch.Tensor, end: torch.Tensor | None, *, mode: str, device: torch.device
) -> torch.Tensor:
    """CLIP features ``[N, 257, 1280]`` (CPU) of a request's images: the start image, and for
    ``flf2v`` also the end image cropped to the start's aspect and resized to its size."""
    images = [start]
    if end is not None and mode == "flf2v":
        images.append(resize_image(crop_to_aspect(end, *start.shape[1:]), *start.shape[1:]))
    with torch.no_grad():
        return torch.cat([clip_features(clip, image[None].to(device)) for image in images]).cpu()

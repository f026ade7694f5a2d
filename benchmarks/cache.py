"""Caching throughput: items/s for latents and text, and how busy the encoder is kept.

    python benchmarks/cache.py                       # CUDA when available: 832x480x81 videos
    python benchmarks/cache.py --device cpu --items 2 --size 208x128x9 --captions 8 --t5 tiny

Latents: ``--items`` random-content mp4 videos of ``--size`` are cached by
:func:`wan_kernel.pipelines.cache.cache_latents` through the real-size Wan2.1 VAE (random
weights, ``dim=96``) with ``--num_workers`` decoding processes. Printed: items/s, the share of
wall time the VAE was encoding (the goal is >= 90%: decoding, resizing and writing hide behind
it), and the VAE's own encode throughput on already-decoded tensors, measured in the same run
(the ceiling caching can reach).

Text: ``--captions`` captions through :func:`~wan_kernel.pipelines.cache.cache_text` with a
random umt5 stand-in (``--t5 1.3b``: dim 2048, 24 layers, ~1.3B parameters without the
embedding; ``xxl``: the real 4096 x 24 encoder; ``tiny`` for CPUs), builtin byte tokenizer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wan_kernel.dataset.config import load_dataset_config
from wan_kernel.models.t5 import T5Spec
from wan_kernel.models.vae import VAEConfig, WanVAE, WanVAEModel
from wan_kernel.pipelines.cache import CacheSettings, LatentEncoder, TextEncoder, cache_latents, cache_text
from wan_kernel.pipelines.media import write_video
from wan_kernel.testing import randomize_weights

T5_SIZES = {
    "tiny": T5Spec(vocab=258, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2, num_buckets=32),
    "1.3b": T5Spec(
        vocab=32128, dim=2048, dim_attn=2048, dim_ffn=5120, num_heads=32, num_layers=24, num_buckets=32
    ),
    "xxl": T5Spec(
        vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24, num_buckets=32
    ),
}


def build_vae(device: torch.device, dtype: torch.dtype) -> WanVAE:
    with torch.device("meta"):
        model = WanVAEModel(VAEConfig())  # the real size (dim 96)
    model = model.to_empty(device="cpu")
    randomize_weights(model, 1)
    return WanVAE(model.to(device=device, dtype=dtype).eval().requires_grad_(False))


def build_t5(spec: T5Spec, device: torch.device, dtype: torch.dtype):
    from transformers import UMT5EncoderModel

    config = spec.to_config()
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    model = model.to_empty(device="cpu")
    randomize_weights(model, 2)
    model.encoder.embed_tokens.weight = model.shared.weight
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def make_videos(folder: Path, count: int, width: int, height: int, frames: int) -> None:
    """Moving gradients plus noise (compressible, but not trivially)."""
    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    folder.mkdir(parents=True)
    for i in range(count):
        video = np.empty((frames, height, width, 3), np.uint8)
        for f in range(frames):
            base = (x * (1 + 0.01 * f) + y * 0.5 + 10 * i) % 256
            video[f] = np.clip(base + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)
        write_video(folder / f"v{i:03d}.mp4", video, fps=16)
        (folder / f"v{i:03d}.txt").write_text(f"video number {i} of a moving gradient")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--size", default=None, help="WxHxF of the videos [832x480x81 on CUDA, 208x128x9 on CPU]"
    )
    parser.add_argument("--items", type=int, default=None, help="videos [16 on CUDA, 2 on CPU]")
    parser.add_argument("--captions", type=int, default=None, help="captions [256 on CUDA, 16 on CPU]")
    parser.add_argument(
        "--t5", choices=sorted(T5_SIZES), default=None, help="T5 stand-in [1.3b on CUDA, tiny on CPU]"
    )
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--text_batch_size", type=int, default=16)
    parser.add_argument("--runs", type=int, default=1, help="timed repeats of the raw VAE encode")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    size = args.size or ("832x480x81" if cuda else "208x128x9")
    width, height, frames = (int(v) for v in size.lower().split("x"))
    if width % 16 or height % 16 or (frames - 1) % 4:
        sys.exit(f"--size {size}: W and H must be multiples of 16 and F of the form 4k+1")
    items = args.items or (16 if cuda else 2)
    captions = args.captions or (256 if cuda else 16)
    t5_size = args.t5 or ("1.3b" if cuda else "tiny")
    dtype = torch.bfloat16 if cuda else torch.float32
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if cuda else 'cpu'}), dtype {dtype}, "
        f"torch {torch.__version__}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        make_videos(root / "videos", items, width, height, frames)
        print(f"made {items} videos of {width}x{height}x{frames} in {time.perf_counter() - start:.1f} s")
        (root / "dataset.toml").write_text(
            f'[[datasets]]\nvideo_directory = "{(root / "videos").as_posix()}"\n'
            f'cache_directory = "{(root / "cache").as_posix()}"\ncaption_extension = ".txt"\n'
            f"resolution = [{width}, {height}]\ntarget_frames = [{frames}]\n"
        )
        group = load_dataset_config(root / "dataset.toml")

        # --- latents ---------------------------------------------------------------------
        vae = build_vae(device, dtype)
        video = torch.rand(1, 3, frames, height, width, device=device) * 2 - 1
        vae.encode(video)  # warm-up
        raw = []
        for _ in range(args.runs):
            if cuda:
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            vae.encode(video)
            if cuda:
                torch.cuda.synchronize(device)
            raw.append(time.perf_counter() - t)
        raw_rate = 1 / statistics.median(raw)
        settings = CacheSettings(batch_size=args.batch_size, num_workers=args.num_workers, progress=False)
        encoder = LatentEncoder(vae)
        report = cache_latents(group, encoder, settings, log=lambda m: None)
        if not report.ok:
            sys.exit(report.summary())
        rate = report.cached / report.wall_seconds
        print(
            f"latents: {report.cached} items in {report.wall_seconds:.2f} s = {rate:.3f} items/s; "
            f"VAE busy {100 * report.busy_fraction:.1f}% of wall time; "
            f"VAE alone {raw_rate:.3f} items/s (median of {args.runs}) -> caching at "
            f"{100 * rate / raw_rate:.1f}% of the VAE's own throughput"
        )
        if cuda:
            print(f"  peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
        del vae, encoder
        if cuda:
            torch.cuda.empty_cache()

        # --- text ------------------------------------------------------------------------
        from wan_kernel.models.tokenizer import load_tokenizer

        spec = T5_SIZES[t5_size]
        t5 = build_t5(spec, device, dtype)
        params = sum(p.numel() for p in t5.parameters())
        text_root = root / "text"
        text_root.mkdir()
        for i in range(captions):
            (text_root / f"c{i:04d}.png").write_bytes(b"")  # text caching never opens the media
            (text_root / f"c{i:04d}.txt").write_text(
                f"caption {i}: " + "a slow pan across a city at dusk " * (1 + i % 4)
            )
        (root / "text.toml").write_text(
            f'[[datasets]]\nimage_directory = "{text_root.as_posix()}"\ncaption_extension = ".txt"\n'
            f"batch_size = {args.text_batch_size}\n"
        )
        text_group = load_dataset_config(root / "text.toml")
        encoder = TextEncoder(t5, load_tokenizer("builtin:bytes"), device=device)
        encoder.encode(["warm-up"])
        encoder.seconds = 0.0
        report = cache_text(text_group, encoder, CacheSettings(progress=False), log=lambda m: None)
        if not report.ok:
            sys.exit(report.summary())
        print(
            f"text ({t5_size} stand-in, {params / 1e6:,.1f}M parameters, batch {args.text_batch_size}): "
            f"{report.cached} captions in {report.wall_seconds:.2f} s = "
            f"{report.cached / report.wall_seconds:.2f} items/s; "
            f"T5 busy {100 * report.busy_fraction:.1f}% of wall time"
        )


if __name__ == "__main__":
    main()

"""``wan run cache``, ``wan run cache-latents``, ``wan run cache-text``: the caches training reads.

The seed trainer's ``wan_cache_latents.py`` and ``wan_cache_text_encoder_outputs.py`` options are
accepted under their own spellings, so a seed command line works with ``python
wan_cache_latents.py`` replaced by ``wan run cache-latents``. ``wan run cache`` does both in one
command, one model at a time.
"""

from __future__ import annotations

import click
from wan_cli.errors import handle_wan_errors

from wan_kernel.errors import InputError

EPILOG = """\b
Examples:
  wan run cache --dataset_config dataset.toml --vae wan_2.1_vae.safetensors \\
      --t5 models_t5_umt5-xxl-enc-bf16.pth
  wan run cache --dataset_config dataset.toml --dry-run
  wan run cache-latents --dataset_config dataset.toml --vae wan_2.1_vae.safetensors \\
      --clip models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth     # i2v training
  wan run cache-text --dataset_config dataset.toml --t5 models_t5_umt5-xxl-enc-bf16.pth --batch_size 16
\b
Caches go to each dataset's cache_directory: <name>_<W>x<H>_wan.safetensors (latents, one per
image or video clip) and <name>_wan_te.safetensors (text). Several GPUs: accelerate launch (or
torchrun) -m wan_cli.main run cache ...; each process caches its share.
"""


def _option(*names, **kwargs):
    kwargs.setdefault("show_default", True)
    return click.option(*names, **kwargs)


def _common(func):
    for decorator in reversed(
        [
            _option(
                "--dataset_config",
                required=True,
                type=click.Path(dir_okay=False),
                help="The dataset TOML (the seed trainer's format).",
            ),
            _option("--device", default=None, help="cpu, cuda or cuda:N [default: cuda when available]."),
            _option(
                "--batch_size",
                type=click.IntRange(min=1),
                default=None,
                help="Items per encoder batch [default: each dataset's batch_size].",
            ),
            _option(
                "--num_workers",
                type=click.IntRange(min=0),
                default=None,
                help="Processes decoding media while the encoder runs (0: in the main process) "
                "[default: CPU count - 1, at most 8].",
            ),
            _option("--skip_existing", is_flag=True, help="Compute only items without a complete cache."),
            _option(
                "--keep_cache",
                is_flag=True,
                help="Keep cache files of items no longer in the dataset (by default they are removed).",
            ),
            _option(
                "--dry-run",
                "--dry_run",
                "dry_run",
                is_flag=True,
                help="Load no model: list every file (size, fps, frames, bucket, clips), every dropped "
                "item with the reason, and the items per bucket.",
            ),
            _option("--no_progress", is_flag=True, help="No progress bar (for logs)."),
        ]
    ):
        func = decorator(func)
    return func


def _latent_options(func):
    for decorator in reversed(
        [
            _option(
                "--vae", type=click.Path(), default=None, help="VAE weights (Wan2.1_VAE.pth or .safetensors)."
            ),
            _option(
                "--vae_dtype",
                default="bfloat16",
                help="Dtype the VAE runs in and the latents are stored in (float32, bfloat16, float16).",
            ),
            _option("--vae_cache_cpu", is_flag=True, help="Keep the VAE's causal cache in CPU memory."),
            _option(
                "--disable_cudnn_backend",
                is_flag=True,
                help="Run the VAE without cuDNN (works around cuDNN errors on some GPUs).",
            ),
            _option(
                "--clip",
                type=click.Path(),
                default=None,
                help="CLIP weights: also cache the image-to-video conditioning and CLIP features "
                "(implies --i2v).",
            ),
            _option(
                "--i2v",
                is_flag=True,
                help="Also cache the first-frame conditioning latent (mask + latent, 20 channels).",
            ),
            _option(
                "--debug_mode",
                type=click.Choice(["image", "console", "video"]),
                default=None,
                help="Cache nothing, show the prepared inputs instead: image/video write each bucketed "
                "item (PNG of its first frame / mp4) to <cache_directory>/.wan_debug/, console lists them "
                "(as --dry-run).",
            ),
            _option(
                "--console_num_images",
                type=click.IntRange(min=1),
                default=None,
                help="With --debug_mode image/video: write at most this many items [default: all].",
            ),
            _option(
                "--console_width",
                type=click.IntRange(min=1),
                default=None,
                help="Accepted for seed command lines; the console listing here is text, so it has no "
                "effect (a notice says so).",
            ),
            _option(
                "--console_back",
                default=None,
                help="Accepted for seed command lines; no effect here (a notice says so).",
            ),
        ]
    ):
        func = decorator(func)
    return func


def _text_options(func):
    for decorator in reversed(
        [
            _option(
                "--t5", type=click.Path(), default=None, help="T5 weights (models_t5_umt5-xxl-enc-bf16.pth)."
            ),
            _option("--fp8_t5", is_flag=True, help="Run the T5 encoder with fp8 weights."),
            _option(
                "--t5_tokenizer",
                default=None,
                help="Tokenizer folder or hub id [default: google/umt5-xxl]; builtin:bytes needs no file "
                "(tiny test encoders only).",
            ),
        ]
    ):
        func = decorator(func)
    return func


def _run(options: dict, *, latents: bool, text: bool) -> None:
    from wan_kernel.pipelines.cache import CacheJob, CacheSettings, dry_run, run_cache, write_debug_media
    from wan_kernel.pipelines.distributed import Ranks

    settings = CacheSettings(
        batch_size=options["batch_size"],
        num_workers=options["num_workers"],
        skip_existing=options["skip_existing"],
        keep_cache=options["keep_cache"],
        progress=not options["no_progress"] and Ranks.from_env().is_main,
    )
    debug_mode = options.get("debug_mode")
    for name in ("console_width", "console_back"):
        if options.get(name) is not None:
            click.echo(f"note: --{name} has no effect here (the debug listing is text)", err=True)
    if options["dry_run"] or debug_mode == "console":
        from wan_kernel.dataset.config import load_dataset_config

        report = dry_run(
            load_dataset_config(options["dataset_config"]), workers=settings.workers(), log=click.echo
        )
        if report.failed:
            raise InputError(f"{len(report.failed)} file(s) could not be read (listed above)")
        return
    if debug_mode:
        from wan_kernel.dataset.config import load_dataset_config

        written = write_debug_media(
            load_dataset_config(options["dataset_config"]),
            mode=debug_mode,
            workers=settings.workers(),
            limit=options.get("console_num_images"),
        )
        for path in written:
            click.echo(str(path))
        return
    if latents and not options.get("vae") and not text:
        raise InputError("--vae is required to cache latents (or use --dry-run)")
    if text and not options.get("t5") and not latents:
        raise InputError("--t5 is required to cache text encoder outputs (or use --dry-run)")
    job = CacheJob(
        dataset_config=options["dataset_config"],
        vae=options.get("vae") if latents else None,
        vae_dtype=options.get("vae_dtype") or "bfloat16",
        vae_cache_cpu=bool(options.get("vae_cache_cpu")),
        disable_cudnn=bool(options.get("disable_cudnn_backend")),
        clip=options.get("clip") if latents else None,
        i2v=bool(options.get("i2v")),
        t5=options.get("t5") if text else None,
        fp8_t5=bool(options.get("fp8_t5")),
        t5_tokenizer=options.get("t5_tokenizer"),
        device=options["device"],
        settings=settings,
    )
    reports = run_cache(job)
    if Ranks.from_env().is_main:
        for report in reports:
            click.echo(report.summary(), err=True)
    failed = sum(len(r.failed) for r in reports)
    if failed:
        raise InputError(f"{failed} item(s) failed (listed above); everything else was cached")


@click.command(epilog=EPILOG)
@_common
@_latent_options
@_text_options
@handle_wan_errors
def cache(**options) -> None:
    """Write every cache training needs: latents (with --vae) and text (with --t5), in one run.

    One model at a time, each freed before the next: CLIP (image-to-video), the VAE, the T5.
    """
    if not options["vae"] and not options["t5"] and not options["dry_run"] and not options["debug_mode"]:
        raise InputError("nothing to cache: give --vae (latents) and/or --t5 (text), or --dry-run")
    _run(options, latents=True, text=True)


@click.command(epilog=EPILOG)
@_common
@_latent_options
@handle_wan_errors
def cache_latents(**options) -> None:
    """Cache VAE latents (and image-to-video conditioning) of a dataset (the seed's wan_cache_latents.py)."""
    _run(options, latents=True, text=False)


@click.command(epilog=EPILOG)
@_common
@_text_options
@handle_wan_errors
def cache_text(**options) -> None:
    """Cache T5 outputs of a dataset's captions (the seed's wan_cache_text_encoder_outputs.py)."""
    _run(options, latents=False, text=True)

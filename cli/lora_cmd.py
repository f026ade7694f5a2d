"""``wan lora``: convert, merge, inspect, resize and average LoRA files.

The seed trainer's spellings work: ``convert_lora.py``'s ``--input --output --target other|default
--diffusers_prefix``, the generator's ``--lora_weight A B --lora_multiplier 1.0 0.5``, and
``lora_post_hoc_ema.py``'s ``PATHS... --output_file --beta --beta2 --sigma_rel --no_sort``.
Outputs are written atomically and never over an existing file without ``--overwrite``.
"""

from __future__ import annotations

import json

import click
from wan_cli.errors import handle_wan_errors
from wan_cli.generate import expand_multi_value_options
from wan_cli.types import FINITE_FLOAT

from wan_kernel.errors import InputError

TARGETS = ("kohya", "default", "comfyui", "other", "diffusers")
TARGET_HELP = (
    "kohya (= default: lora_unet_..., musubi-tuner's training output), comfyui (= other: "
    "diffusion_model.<module>.lora_A/B, alpha folded in), "
    "diffusers (transformer.<diffusers module>.lora_A/B)."
)


class _FiniteFloat(click.FloatRange):
    """:data:`wan_cli.types.FINITE_FLOAT` (no NaN, no Inf) with a range; checked when the command line
    is parsed (exit 2)."""

    def convert(self, value, param, ctx):
        return super().convert(FINITE_FLOAT.convert(value, param, ctx), param, ctx)


FINITE = _FiniteFloat()


class _SeedSpellingCommand(click.Command):
    """Accepts ``--lora_weight A B`` (the seed's ``nargs``) as well as repeated options."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_multi_value_options(list(args)))


def _dtype(name: str | None):
    if name is None:
        return None
    from wan_kernel.models.dit_loading import resolve_dtype

    return resolve_dtype(name)


@click.command("convert")
@click.option(
    "--input",
    "input_",
    required=True,
    type=click.Path(dir_okay=False),
    help="LoRA file to read (any layout).",
)
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="LoRA file to write.")
@click.option("--target", type=click.Choice(TARGETS), default="kohya", show_default=True, help=TARGET_HELP)
@click.option(
    "--diffusers_prefix",
    default=None,
    help="Key prefix written instead of diffusion_model (comfyui) or transformer (diffusers).",
)
@click.option("--strict", is_flag=True, help="Fail when some tensors name no Wan2.1 DiT module.")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
@handle_wan_errors
def convert(input_, output, target, diffusers_prefix, strict, overwrite) -> None:
    """Convert a LoRA file between the kohya, ComfyUI and diffusers layouts (same delta in each)."""
    from wan_kernel.lora.convert import convert_lora

    result = convert_lora(input_, output, target, prefix=diffusers_prefix, strict=strict, overwrite=overwrite)
    click.echo(
        f"wrote {result.path} ({result.layout} layout, {result.modules} modules, {result.tensors} tensors)"
    )
    if result.left_out:
        shown = ", ".join(result.left_out[:5]) + (" ..." if len(result.left_out) > 5 else "")
        click.echo(
            f"warning: {len(result.left_out)} tensor(s) name no Wan2.1 DiT module and were left out: {shown}",
            err=True,
        )


@click.command("merge", cls=_SeedSpellingCommand)
@click.option(
    "--lora_weight", multiple=True, required=True, help="LoRA file (repeat, or list several after it)."
)
@click.option("--lora_multiplier", type=FINITE, multiple=True, help="Strength per LoRA.  [default: 1.0 each]")
@click.option("--include_patterns", multiple=True, help="Regex of LoRA modules to keep, one per LoRA.")
@click.option("--exclude_patterns", multiple=True, help="Regex of LoRA modules to drop, one per LoRA.")
@click.option(
    "--dit",
    type=click.Path(dir_okay=True),
    default=None,
    help="Merge into this DiT file (else: into one LoRA).",
)
@click.option(
    "--output",
    "--save_merged_model",
    "output",
    required=True,
    type=click.Path(dir_okay=False),
    help="File to write.",
)
@click.option("--quant", default=None, help="With --dit: write the merged DiT quantized (fp8_scaled, fp8).")
@click.option(
    "--target",
    type=click.Choice(TARGETS),
    default="kohya",
    show_default=True,
    help="Layout of a merged LoRA.",
)
@click.option("--device", default=None, help="Where to compute the merge (cpu, cuda).  [default: cpu]")
@click.option("--strict", is_flag=True, help="Fail when a LoRA has tensors that match nothing.")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
@handle_wan_errors
def merge(
    lora_weight,
    lora_multiplier,
    include_patterns,
    exclude_patterns,
    dit,
    output,
    quant,
    target,
    device,
    strict,
    overwrite,
) -> None:
    """Merge LoRAs into a DiT file (its layout and dtypes, or --quant), or into one exact LoRA.

    \b
    wan lora merge --dit wan2.1_t2v_14B_bf16.safetensors --lora_weight a.safetensors b.safetensors \\
        --lora_multiplier 1.0 0.5 --output merged.safetensors
    wan lora merge --lora_weight a.safetensors b.safetensors --output both.safetensors
    """
    from wan_kernel.lora import specs_from_options

    specs = specs_from_options(lora_weight, lora_multiplier, include_patterns, exclude_patterns)
    if dit is None:
        if quant:
            raise InputError("--quant applies to a merged DiT; pass --dit")
        from wan_kernel.lora.convert import combine_loras

        path, ranks = combine_loras(specs, output, target=target, strict=strict, overwrite=overwrite)
        click.echo(f"wrote {path} ({len(ranks)} modules, rank {min(ranks.values())}-{max(ranks.values())})")
        return
    write_merged_dit(dit, specs, output, quant=quant, device=device, strict=strict, overwrite=overwrite)


def write_merged_dit(dit, specs, output, *, quant=None, device=None, strict=False, overwrite=False) -> None:
    """What ``wan lora merge --dit`` and ``wan run generate --save_merged_model`` do."""
    from wan_kernel.lora.merge import merge_into_dit

    quantizer = None
    if quant:
        from wan_kernel.pipelines.plugin_setup import resolve_quantizer

        quantizer = resolve_quantizer(quant, target="dit")
    log = lambda line: click.echo(line, err=True)
    path, reports = merge_into_dit(
        dit, specs, output, quantizer=quantizer, strict=strict, overwrite=overwrite, device=device, log=log
    )
    click.echo(
        f"wrote {path} ({sum(len(r.merged) for r in reports)} module merges from {len(reports)} LoRA(s))"
    )


@click.command("info")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--modules", "per_module", is_flag=True, help="List rank and alpha of every module.")
@handle_wan_errors
def info(file, as_json, per_module) -> None:
    """Layout, ranks, targeted blocks, which model it fits, metadata and hashes of a LoRA file."""
    from wan_kernel.lora.info import format_info, lora_info

    data = lora_info(file)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(format_info(data, per_module=per_module))


@click.command("resize")
@click.option("--input", "input_", required=True, type=click.Path(dir_okay=False), help="LoRA file to read.")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="LoRA file to write.")
@click.option("--rank", type=click.IntRange(min=1), required=True, help="The new (maximum) rank.")
@click.option(
    "--target", type=click.Choice(TARGETS), default=None, help="Output layout.  [default: the input's]"
)
@click.option(
    "--dtype", default=None, help="Save dtype (float32, bfloat16, float16).  [default: the input's]"
)
@click.option("--strict", is_flag=True, help="Fail when some tensors name no Wan2.1 DiT module.")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
@handle_wan_errors
def resize(input_, output, rank, target, dtype, strict, overwrite) -> None:
    """Reduce a LoRA's rank by an SVD of each module's delta; prints the energy each module keeps."""
    from wan_kernel.lora.resize import resize_lora

    path, energy = resize_lora(
        input_, output, rank, target=target, dtype=_dtype(dtype), strict=strict, overwrite=overwrite
    )
    if energy:
        values = sorted(energy.values())
        worst = min(energy, key=energy.get)
        click.echo(
            f"wrote {path}: {len(energy)} modules at rank <= {rank}; kept energy min {values[0]:.4f} "
            f"({worst}), median {values[len(values) // 2]:.4f}, max {values[-1]:.4f}"
        )
        for name in sorted(energy):
            click.echo(f"  {name}: {energy[name]:.6f}", err=True)


@click.command("ema")
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--output_file",
    "--output",
    "output",
    required=True,
    type=click.Path(dir_okay=False),
    help="LoRA file to write.",
)
@click.option(
    "--beta", type=_FiniteFloat(0.0, 1.0), default=0.95, show_default=True, help="Decay rate (0 to 1)."
)
@click.option(
    "--beta2",
    type=_FiniteFloat(0.0, 1.0),
    default=None,
    help="Decay at the last checkpoint (linear from --beta; 0 to 1).",
)
@click.option("--sigma_rel", type=FINITE, default=None, help="Power-function EMA width (overrides --beta).")
@click.option("--no_sort", is_flag=True, help="Merge in the order given, not by modification time.")
@click.option("--overwrite", is_flag=True, help="Replace --output_file if it exists.")
@handle_wan_errors
def ema(paths, output, beta, beta2, sigma_rel, no_sort, overwrite) -> None:
    """Post-hoc EMA over LoRA checkpoints of one run (the seed's lora_post_hoc_ema.py)."""
    from wan_kernel.lora.ema import ema_loras

    log = lambda line: click.echo(line, err=True)
    path = ema_loras(
        paths,
        output,
        beta=beta,
        beta2=beta2,
        sigma_rel=sigma_rel,
        sort=not no_sort,
        overwrite=overwrite,
        log=log,
    )
    click.echo(f"wrote {path} (EMA of {len(paths)} checkpoints)")

"""``wan run generate``: text-, image- and first-last-frame-to-video with Wan2.1.

Every option of the seed trainer's ``wan_generate_video.py`` that the seed documents is
accepted under its own spelling (``--attn_mode``, ``--fp8``, ``--fp8_scaled``, ``--fp8_fast``,
``--fp8_t5``, ``--infer_steps``, ...), so a seed command line works with ``python
wan_generate_video.py`` replaced by ``wan run generate``.
"""

from __future__ import annotations

import sys

import click
from wan_cli.errors import VERBOSE_META_KEY, handle_wan_errors
from wan_cli.types import FINITE_FLOAT, SEED

from wan_kernel.errors import InputError, WanError
from wan_kernel.pipelines.config import OUTPUT_TYPES
from wan_kernel.pipelines.media import BACKGROUNDS
from wan_kernel.pipelines.tasks import TASKS
from wan_kernel.sampling.solvers import SOLVER_CHOICES

TASK_NAMES = tuple(TASKS)
PRESETS = ("demo",)
COMPUTE_DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
"""--dit_dtype / --vae_dtype (auto: bfloat16 on CUDA, float32 on CPU)."""
FP8_FLAGS = ("fp8", "fp8_scaled", "fp8_fast")  # in increasing precedence: --fp8 --fp8_scaled -> fp8_scaled

EPILOG = """\b
Examples:
  wan run generate --preset demo --prompt "a red fox running through snow"
  wan run generate --task t2v-1.3B --video_size 480 832 --video_length 81 --infer_steps 20 \\
      --prompt "..." --save_path out/ --dit wan2.1_t2v_1.3B_bf16.safetensors \\
      --vae wan_2.1_vae.safetensors --t5 models_t5_umt5-xxl-enc-bf16.pth
  wan run generate --task i2v-14B --image_path start.jpg --clip models_clip_...pth ...
\b
--video_size is HEIGHT WIDTH. Unset sampling options take the task's defaults (steps 50 for
t2v/t2i, 40 for i2v/flf2v; flow shift 5.0, 3.0 for i2v at 480x832/832x480, 16 for flf2v;
guidance 5.0; the official negative prompt). Outputs: --save_path is a folder (files named
<time>_<seed>), or a file name ending in .mp4/.png/.safetensors. Transparent input images are
flattened onto --image_background (white unless told).
"""


def _option(*names, **kwargs):
    kwargs.setdefault("show_default", True)
    return click.option(*names, **kwargs)


def _quant_choice(quant: str | None, fp8: bool, fp8_scaled: bool, fp8_fast: bool) -> str | None:
    flags = [name for name, on in zip(FP8_FLAGS, (fp8, fp8_scaled, fp8_fast)) if on]
    chosen = flags[-1] if flags else None
    if quant and chosen and quant != chosen:
        raise InputError(f"--quant {quant} disagrees with --{chosen}; give one of them")
    return quant or chosen


def _given(ctx: click.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source != click.core.ParameterSource.DEFAULT


MULTI_VALUE_OPTIONS = ("--lora_weight", "--lora_multiplier", "--include_patterns", "--exclude_patterns")
"""Options the seed trainer takes as ``--opt A B C`` (argparse ``nargs="*"``); we take them
repeated (``--opt A --opt B``) and also accept the seed's spelling."""


def expand_multi_value_options(args: list[str], names: tuple[str, ...] = MULTI_VALUE_OPTIONS) -> list[str]:
    """Rewrite ``--opt A B`` into ``--opt A --opt B`` for the ``names`` options.

    Values run until the next token that looks like an option (``-x``/``--x``, but not a
    negative number such as ``-1.0``) or until ``--``.
    """

    def is_option(token: str) -> bool:
        if not token.startswith("-") or token == "-":
            return False
        try:
            float(token)
        except ValueError:
            return True
        return False

    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            out.extend(args[i:])
            break
        if token not in names:
            out.append(token)
            i += 1
            continue
        values = []
        i += 1
        while i < len(args) and args[i] != "--" and not is_option(args[i]):
            values.append(args[i])
            i += 1
        if not values:
            out.append(token)  # let click report the missing value
        for value in values:
            out.extend((token, value))
    return out


class GenerateCommand(click.Command):
    """Accepts the seed trainer's multi-value options (``--lora_weight a b``) as well as repeats."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_multi_value_options(list(args)))


@click.command("generate", cls=GenerateCommand, epilog=EPILOG, context_settings={"max_content_width": 110})
# what to generate
@_option("--prompt", "-p", default=None, help="Text prompt (or use --from_file / --interactive).")
@_option("--negative_prompt", default=None, help="Negative prompt  [default: the official Wan2.1 one]")
@_option(
    "--task",
    type=click.Choice(TASK_NAMES),
    default=None,
    help="Task; read from the DiT weights when left out (confirms it, or picks t2i-14B over t2v-14B).",
)
@_option(
    "--preset",
    type=click.Choice(PRESETS),
    default=None,
    help="'demo': built-in tiny untrained models, no files needed (a smoke test of the install).",
)
@_option(
    "--video_size",
    type=(int, int),
    default=None,
    metavar="HEIGHT WIDTH",
    help="Size in pixels, height first; for i2v/flf2v the area (the aspect comes from the image).  "
    "[default: 480 832]",
)
@_option(
    "--video_length",
    "--frames",
    "video_length",
    type=int,
    default=None,
    help="Frames, 4n+1 (1 for t2i).  [default: 81; t2i 1]",
)
@_option("--fps", type=int, default=None, help="Frames per second of the mp4.  [default: 16]")
@_option(
    "--infer_steps",
    "--steps",
    "infer_steps",
    type=int,
    default=None,
    help="Denoising steps.  [default: 50 t2v/t2i, 40 i2v/flf2v]",
)
@_option(
    "--flow_shift",
    type=FINITE_FLOAT,
    default=None,
    help="Noise-schedule shift.  [default: 5.0; i2v 480p 3.0; flf2v 16]",
)
@_option(
    "--guidance_scale",
    type=FINITE_FLOAT,
    default=None,
    help="Classifier-free guidance scale.  [default: 5.0]",
)
@_option(
    "--sample_solver",
    type=click.Choice(SOLVER_CHOICES),
    default="unipc",
    help="Sampler ('vanilla' = euler).",
)
@_option("--seed", type=SEED, default=None, help="Seed; random when left out (always printed and saved).")
@_option(
    "--cpu_noise",
    is_flag=True,
    help="Draw the initial noise on the CPU (ComfyUI-compatible) instead of the device.",
)
@_option(
    "--image_path",
    default=None,
    help="Start image for i2v/flf2v (any format PIL reads; EXIF orientation applied).",
)
@_option(
    "--end_image_path",
    default=None,
    help="End image: flf2v models; with an i2v model an experimental extra frame (use --trim_tail_frames 3).",
)
@_option(
    "--image_background",
    type=click.Choice(list(BACKGROUNDS)),
    default="white",
    help="Colour transparent pixels of input images are flattened onto.",
)
@_option("--trim_tail_frames", type=int, default=0, help="Drop this many frames from the end before saving.")
@_option(
    "--cfg_skip_mode",
    default="none",
    help="CFG schedule plugin: none, early, late, middle, early_late, alternate (or a third-party name).",
)
@_option(
    "--cfg_apply_ratio",
    type=FINITE_FLOAT,
    default=None,
    help="Share of steps that apply CFG (0..1); skip modes act only when this is given.",
)
# outputs
@_option(
    "--output_type",
    type=click.Choice(OUTPUT_TYPES),
    default="video",
    help="both = latent + video; latent_images = latent + PNG frames.",
)
@_option(
    "--save_path", default="outputs", help="Output folder, or a file path ending in .mp4/.png/.safetensors."
)
@_option("--latent_path", default=None, help="Decode a saved latent (.safetensors) instead of generating.")
@_option("--no_metadata", is_flag=True, help="Write no prompt/settings metadata into the outputs.")
@_option(
    "--from_file",
    default=None,
    help="Prompt file: one prompt per line, with --w --h --f --d --s --g --fs --n --i --ei.",
)
@_option("--interactive", is_flag=True, help="Read prompt lines from stdin until EOF; models stay loaded.")
# models
@_option("--dit", default=None, help="DiT weights (.safetensors file, folder of shards, or .pth).")
@_option("--vae", default=None, help="VAE weights (Wan2.1_VAE.pth or wan_2.1_vae.safetensors).")
@_option(
    "--t5",
    default=None,
    help="T5 encoder weights (models_t5_umt5-xxl-enc-bf16.pth or umt5_xxl_*.safetensors).",
)
@_option(
    "--clip",
    default=None,
    help="CLIP weights for i2v/flf2v (models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth).",
)
@_option(
    "--t5_tokenizer",
    default=None,
    help="Tokenizer folder or hub id (builtin:bytes for tiny test encoders).  [default: google/umt5-xxl]",
)
@_option(
    "--num_heads",
    type=int,
    default=None,
    help="DiT attention heads when no config.json is beside the weights.",
)
@_option(
    "--dit_dtype",
    type=click.Choice(COMPUTE_DTYPE_CHOICES),
    default="auto",
    help="DiT compute dtype (auto: bfloat16 on CUDA, float32 on CPU).",
)
@_option(
    "--vae_dtype",
    type=click.Choice(COMPUTE_DTYPE_CHOICES),
    default="auto",
    help="VAE dtype (auto: bfloat16 on CUDA, float32 on CPU).",
)
# plugins and memory
@_option(
    "--attn",
    "--attn_mode",
    "attn",
    default="sdpa",
    help="Attention plugin: sdpa (= torch), xformers, sageattn, flash (= flash2), flash3, "
    "or a third-party name.",
)
@_option("--quant", default=None, help="DiT weight quantization plugin (fp8, fp8_scaled, fp8_fast, ...).")
@_option("--fp8", "--fp8_base", "fp8", is_flag=True, help="Same as --quant fp8.")
@_option("--fp8_scaled", is_flag=True, help="Same as --quant fp8_scaled (with or without --fp8).")
@_option("--fp8_fast", is_flag=True, help="Same as --quant fp8_fast (CUDA, fp8 matmuls).")
@_option("--fp8_t5", is_flag=True, help="Run the T5 encoder with fp8 weights (--t5_quant fp8_t5).")
@_option("--t5_quant", default=None, help="T5 weight quantization plugin (fp8_t5, ...).")
@_option(
    "--offload", default=None, help="Offload plugin (blockswap); --blocks_to_swap alone selects blockswap."
)
@_option("--blocks_to_swap", type=int, default=0, help="DiT blocks kept in CPU memory and swapped in (CUDA).")
@_option("--compile", is_flag=True, help="torch.compile each transformer block.")
@_option("--vae_cache_cpu", is_flag=True, help="Keep the VAE's causal feature cache in CPU memory.")
@_option("--device", default=None, help="cpu, cuda or cuda:N.  [default: cuda when available, else cpu]")
# LoRA
@_option("--lora_weight", "lora_weight", multiple=True, help="LoRA file to apply (several: repeat the option, or list them after it).")
@_option(
    "--lora_multiplier",
    "lora_multiplier",
    type=FINITE_FLOAT,
    multiple=True,
    help="Strength per LoRA.  [default: 1.0 each]",
)
@_option("--include_patterns", multiple=True, help="Regex of LoRA modules to keep, one per LoRA.")
@_option("--exclude_patterns", multiple=True, help="Regex of LoRA modules to drop, one per LoRA.")
@_option("--lora_strict", is_flag=True, help="Fail when a LoRA has tensors that match nothing in the DiT.")
@_option(
    "--save_merged_model",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the DiT with the LoRAs merged to this file (as `wan lora merge`) and exit.",
)
@_option("--verbose", is_flag=True, help="Show tracebacks of errors (same as WAN_DEBUG=1).")
@click.pass_context
@handle_wan_errors
def generate(ctx: click.Context, **options) -> None:
    """Generate videos (or images) with a Wan2.1 model.

    Try it with no downloads: wan run generate --preset demo --prompt "a red fox running through snow"
    """
    ctx.meta[VERBOSE_META_KEY] = options.pop("verbose")
    run_generate(ctx, options)


def _build_config(options: dict):
    """The :class:`GenerateConfig` of the parsed options: same-named options are passed as they
    are; the seed's spellings (--fp8*, --fp8_t5, vanilla, singular --lora_*) are translated."""
    import attrs

    from wan_kernel.pipelines.generate import GenerateConfig

    fields = {field.name for field in attrs.fields(GenerateConfig)}
    values = {name: value for name, value in options.items() if name in fields}
    values.update(
        quant=_quant_choice(options["quant"], options["fp8"], options["fp8_scaled"], options["fp8_fast"]),
        t5_quant=options["t5_quant"] or ("fp8_t5" if options["fp8_t5"] else None),
        sample_solver="euler" if options["sample_solver"] == "vanilla" else options["sample_solver"],
        lora_weights=options["lora_weight"],
        lora_multipliers=options["lora_multiplier"],
    )
    return GenerateConfig(**values)


def _apply_demo_preset(ctx: click.Context, config) -> None:
    from wan_kernel.demo import DEMO_SETTINGS

    clashing = [
        f"--{name}"
        for name in ("dit", "vae", "t5", "clip", "task", "image_path", "end_image_path")
        if _given(ctx, name)
    ]
    if clashing:
        raise InputError(
            f"--preset demo builds its own tiny models and cannot take {', '.join(clashing)}; "
            "drop --preset to use your own weights"
        )
    if config.video_size is None:
        config.video_size = DEMO_SETTINGS.video_size
    if config.video_length is None:
        config.video_length = DEMO_SETTINGS.frames
    if config.infer_steps is None:
        config.infer_steps = DEMO_SETTINGS.steps
    if config.flow_shift is None:
        config.flow_shift = DEMO_SETTINGS.flow_shift
    if config.fps is None:
        config.fps = DEMO_SETTINGS.fps
    if config.seed is None:
        config.seed = DEMO_SETTINGS.seed


def run_generate(ctx: click.Context, options: dict) -> None:
    """The body of ``wan run generate`` (kept apart from the option declarations)."""
    from wan_kernel.pipelines.generate import GenerationPipeline
    from wan_kernel.pipelines.prompts import read_prompt_file

    config = _build_config(options)
    if options["save_merged_model"]:
        _save_merged_model(config, options["save_merged_model"])
        return
    given = ("prompt", "from_file", "interactive", "latent_path")
    # --prompt '' is a mode too: the config check then says the prompt is empty
    modes = [name for name in given if options[name] not in (None, False)]
    if len(modes) > 1:
        raise InputError(
            "give only one of --prompt, --from_file, --interactive, --latent_path "
            f"(got {', '.join('--' + m for m in modes)})"
        )
    if not modes:
        raise InputError(
            "nothing to do: pass --prompt TEXT, --from_file FILE, --interactive or --latent_path FILE"
        )

    models = None
    if options["preset"] == "demo":
        from wan_kernel.demo import NOTICE, DemoModels

        _apply_demo_preset(ctx, config)
        models = DemoModels()
        click.echo(NOTICE, err=True)

    specs = read_prompt_file(options["from_file"]) if options["from_file"] else None
    pipeline = GenerationPipeline(config, models=models, keep_models=options["interactive"])
    try:
        if options["interactive"]:
            _interactive(pipeline)
        else:
            for result in pipeline.run(specs):
                for path in result.outputs:
                    click.echo(str(path))
        click.echo(pipeline.summary(), err=True)
    finally:
        pipeline.close()


def _save_merged_model(config, output: str) -> None:
    """``--save_merged_model``: the seed's way to bake LoRAs into the DiT (the file ``wan lora merge`` writes)."""
    from wan_cli.lora_cmd import write_merged_dit

    from wan_kernel.lora import specs_from_options

    if not config.dit:
        raise InputError("--save_merged_model needs the DiT: pass --dit PATH")
    if not config.lora_weights:
        raise InputError("--save_merged_model needs at least one --lora_weight to merge")
    specs = specs_from_options(
        config.lora_weights, config.lora_multipliers, config.include_patterns, config.exclude_patterns
    )
    write_merged_dit(
        config.dit, specs, output, quant=config.quant, device=config.device, strict=config.lora_strict
    )


def _interactive(pipeline) -> None:
    """Prompt lines from stdin until EOF; a bad line is reported and skipped, models stay loaded."""
    from wan_kernel.pipelines.prompts import parse_prompt_line

    from wan_kernel.pipelines.prompts import open_stdin_lines

    stdin = open_stdin_lines()  # checked before the models load: a closed stdin is an error now
    pipeline.setup()
    tty = stdin.isatty()
    failed = 0
    while True:
        if tty:
            click.echo("prompt> ", nl=False, err=True)
        try:
            number, line = stdin.next_line()
        except EOFError:
            break
        except WanError as exc:  # a line that is not UTF-8: reported and skipped
            failed += 1
            click.echo(f"error: {exc}", err=True)
            continue
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            spec = parse_prompt_line(line, line_number=number, source="stdin")
            for result in pipeline.run([spec]):
                for path in result.outputs:
                    click.echo(str(path))
        except WanError as exc:
            failed += 1
            click.echo(f"error: {exc}", err=True)
    if failed:
        raise InputError(f"{failed} prompt line(s) failed (see the errors above)")

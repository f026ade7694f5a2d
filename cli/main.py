"""The ``wan`` command: ``wan plugins``, the ``wan run`` group of jobs and the ``wan lora`` tools.

Startup stays cheap: nothing here imports torch. The jobs under ``wan run`` (which do) are
listed in :data:`RUN_COMMANDS` as ``"module:attribute"`` with their one-line help, and imported
only when one of them runs or its own ``--help`` is shown.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Mapping, Sequence

import attrs
import click

from wan_cli.errors import WanCliError, WanGroup, debug_enabled
from wan_cli.plugins_cmd import plugins
from wan_cli.signals import terminate_as_interrupt


@attrs.frozen
class LazyCommand:
    """Where a subcommand lives (``"package.module:attribute"``) and its one-line help."""

    target: str
    short_help: str

    def load(self, name: str) -> click.Command:
        module_name, _, attribute = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
            command = getattr(module, attribute)
        except Exception as exc:  # ImportError, AttributeError, or an error in the module itself
            if debug_enabled():
                raise
            raise WanCliError(
                f"the {name!r} command could not be loaded from {self.target}: "
                f"{type(exc).__name__}: {exc}\n"
                "Reinstall wan (pip install -e . from a checkout); set WAN_DEBUG=1 for the traceback."
            ) from exc
        if not isinstance(command, click.Command):
            raise WanCliError(f"{self.target} is not a click command (got {type(command).__name__})")
        return command


RUN_COMMANDS: dict[str, LazyCommand] = {
    "cache": LazyCommand(
        "wan_cli.cache:cache",
        "Cache VAE latents and T5 outputs of a dataset for training (one model at a time).",
    ),
    "cache-latents": LazyCommand("wan_cli.cache:cache_latents", "Cache VAE latents of a dataset for training."),
    "cache-text": LazyCommand("wan_cli.cache:cache_text", "Cache T5 outputs of a dataset's captions for training."),
    "generate": LazyCommand(
        "wan_cli.generate:generate",
        "Generate videos with a Wan2.1 model (text-, image- and first-last-frame-to-video).",
    ),
}
"""``wan run`` subcommands: name -> where it lives and its one-line help (shown without importing it)."""

LORA_COMMANDS: dict[str, LazyCommand] = {
    "convert": LazyCommand(
        "wan_cli.lora_cmd:convert", "Convert a LoRA between the kohya, ComfyUI and diffusers layouts."
    ),
    "merge": LazyCommand("wan_cli.lora_cmd:merge", "Merge LoRAs into a DiT file, or into one LoRA."),
    "info": LazyCommand(
        "wan_cli.lora_cmd:info", "Layout, ranks, targets, fitting model, metadata and hashes of a LoRA."
    ),
    "resize": LazyCommand(
        "wan_cli.lora_cmd:resize", "Reduce a LoRA's rank by SVD, reporting the kept energy."
    ),
    "ema": LazyCommand("wan_cli.lora_cmd:ema", "Post-hoc EMA over LoRA checkpoints of one run."),
}
"""``wan lora`` subcommands, imported on first use like :data:`RUN_COMMANDS`."""


class LazyGroup(WanGroup):
    """A group whose subcommands are imported on first use, from a name -> :class:`LazyCommand` map."""

    def __init__(self, *args: Any, lazy_commands: Mapping[str, LazyCommand] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lazy_commands: dict[str, LazyCommand] = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        lazy = self.lazy_commands.get(cmd_name)
        if lazy is None:
            return None
        command = lazy.load(cmd_name)
        self.commands[cmd_name] = command  # load once per process
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List subcommands with their one-line help without importing the lazy ones."""
        rows = []
        for name in self.list_commands(ctx):
            if name in self.commands:
                command = self.commands[name]
                if command.hidden:
                    continue
                rows.append((name, command.get_short_help_str(formatter.width - 6 - len(name))))
            else:
                rows.append((name, self.lazy_commands[name].short_help))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=WanGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="wan", prog_name="wan", message="%(prog)s %(version)s")
def cli() -> None:
    """wan: cache, train and generate with the Wan2.1 video diffusion models.

    Attention backends, weight quantization, memory offload, timestep sampling and CFG schedules
    come from plugins; `wan plugins` lists what is installed.

    Set WAN_DEBUG=1 to see tracebacks instead of one-line errors.
    """


@cli.group(
    cls=LazyGroup,
    lazy_commands=RUN_COMMANDS,
    context_settings=CONTEXT_SETTINGS,
    short_help="Run a job: " + ", ".join(sorted(RUN_COMMANDS)) + ".",
)
def run() -> None:
    """Run a job. Each job is its own command with its own --help."""


@cli.group(
    cls=LazyGroup,
    lazy_commands=LORA_COMMANDS,
    context_settings=CONTEXT_SETTINGS,
    short_help="LoRA files: " + ", ".join(sorted(LORA_COMMANDS)) + ".",
)
def lora() -> None:
    """Convert, merge, inspect, resize and average LoRA files for the Wan2.1 DiT."""


cli.add_command(plugins)


def main(argv: Sequence[str] | None = None) -> Any:
    """Console-script entry point (``wan = wan_cli.main:main``); exits the process.

    ``SIGTERM`` is handled like Ctrl-C (:func:`wan_cli.signals.terminate_as_interrupt`): temporary
    files are removed, nothing half-written stays, and the exit is clean.
    """
    with terminate_as_interrupt():
        return cli.main(args=list(argv) if argv is not None else sys.argv[1:], prog_name="wan")


if __name__ == "__main__":  # pragma: no cover - python -m wan_cli.main
    main()

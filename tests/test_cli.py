"""The `wan` shell: help and version, the lazy `wan run` group, startup without torch, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import version

import click
import pytest
from click.testing import CliRunner

from wan_cli.errors import WanCliError, WanGroup, handle_wan_errors
from wan_cli.main import RUN_COMMANDS, LazyCommand, LazyGroup, cli
from wan_kernel.errors import BrokenPluginError, InputError, WeightsError


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("WAN_")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environ, timeout=120
    )


MODULES_AFTER_MAIN = """
import json, sys
from wan_cli.main import main
try:
    main({args!r})
except SystemExit as exc:
    code = exc.code
print(json.dumps({{"code": code, "modules": sorted(sys.modules)}}), file=sys.stderr)
"""


def modules_after(args: list[str], env: dict[str, str] | None = None) -> tuple[int, set[str], str]:
    result = run_python(MODULES_AFTER_MAIN.format(args=args), env)
    report = json.loads(result.stderr.strip().splitlines()[-1])
    return report["code"], set(report["modules"]), result.stdout


# -- help, version, startup -------------------------------------------------------------------


def test_help_lists_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "plugins" in result.stdout and "run" in result.stdout and "WAN_DEBUG" in result.stdout
    assert CliRunner().invoke(cli, ["-h"]).stdout == result.stdout


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"wan {version('wan')}"


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["--version"]])
def test_startup_does_not_import_torch(args):
    code, modules, stdout = modules_after(args)
    assert code == 0, stdout
    assert "torch" not in modules
    for name, lazy in RUN_COMMANDS.items():
        assert lazy.target.partition(":")[0] not in modules, f"`wan {' '.join(args)}` imported the {name} job"


def test_run_help_lists_jobs_from_the_mapping_without_importing_them():
    code, modules, stdout = modules_after(["run", "--help"])
    assert code == 0
    for name, lazy in RUN_COMMANDS.items():
        line = next(line for line in stdout.splitlines() if line.strip().startswith(name))
        assert lazy.short_help.split()[0] in line


def test_plugin_discovery_does_not_import_torch():
    """Every installed plugin's entry module stays light (heavy imports belong in availability())."""
    result = run_python(
        """
        import sys
        from wan_kernel.plugins import PluginManager
        manager = PluginManager()
        heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "xformers", "flash_attn", "sageattention"})
        print(heavy, [r.distribution for r in manager.records])
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("[] "), f"importing plugins pulled in {result.stdout}"


def test_wan_plugins_itself_does_not_import_torch(tmp_path):
    # a torch-free plugin only: what remains is the CLI and discovery themselves
    (tmp_path / "wan_fake_light.py").write_text(
        "from wan_kernel import hookimpl\n"
        "from wan_kernel.interfaces import CfgSchedule\n"
        "class Always(CfgSchedule):\n"
        "    name = 'always_fake'\n"
        "    def applies(self, step, num_steps, apply_ratio):\n"
        "        return True\n"
        "@hookimpl\n"
        "def wan_register_cfg_schedule(register):\n"
        "    register(Always())\n"
    )
    info = tmp_path / "wan_cfg_light-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: wan-cfg-light\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[wan_kernel]\ncfg_light = wan_fake_light\n")
    env = {"PYTHONPATH": str(tmp_path), "WAN_LOAD_PLUGINS": "wan-cfg-light"}
    code, modules, stdout = modules_after(["plugins"], env)
    assert code == 0, stdout
    assert "always_fake" in stdout
    assert "torch" not in modules


def test_wan_plugins_with_every_installed_plugin_does_not_import_torch():
    """Availability checks of the installed plugins are judged without importing torch, so that
    `wan plugins` stays fast on a machine whose CUDA libraries are absent (CI, laptops)."""
    code, modules, stdout = modules_after(["plugins"])
    assert code == 0, stdout
    assert "sdpa" in stdout
    assert "torch" not in modules


# -- the lazy `wan run` group -----------------------------------------------------------------


@click.command()
def _hello() -> None:
    """Say hello."""
    click.echo("hello")


def lazy_group(**lazy: LazyCommand) -> click.Group:
    @click.group(cls=LazyGroup, lazy_commands=lazy)
    def group() -> None:
        """A test group."""

    return group


def test_lazy_command_loads_on_use():
    group = lazy_group(hello=LazyCommand(f"{__name__}:_hello", "Say hello (from the mapping)."))
    help_text = CliRunner().invoke(group, ["--help"]).stdout
    assert "Say hello (from the mapping)." in help_text
    result = CliRunner().invoke(group, ["hello"])
    assert result.exit_code == 0 and result.stdout == "hello\n"


def test_missing_lazy_module_is_a_clean_error(monkeypatch):
    group = lazy_group(ghost=LazyCommand("wan_cli_no_such_module:ghost", "Not there."))
    assert "Not there." in CliRunner().invoke(group, ["--help"]).stdout  # help still works
    result = CliRunner().invoke(group, ["ghost"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: the 'ghost' command could not be loaded from wan_cli_no_such_module:ghost")
    assert "Traceback" not in result.output

    monkeypatch.setenv("WAN_DEBUG", "1")
    result = CliRunner().invoke(group, ["ghost"])
    assert isinstance(result.exception, ModuleNotFoundError)


def test_lazy_target_must_be_a_command():
    group = lazy_group(bad=LazyCommand("os.path:join", "Not a command."))
    result = CliRunner().invoke(group, ["bad"])
    assert result.exit_code == 1
    assert "os.path:join is not a click command" in result.stderr


def test_run_group_maps_generate():
    assert RUN_COMMANDS["generate"].target == "wan_cli.generate:generate"
    result = CliRunner().invoke(cli, ["run", "--help"])
    assert result.exit_code == 0 and "generate" in result.stdout


# -- the error path ---------------------------------------------------------------------------


def failing_group(exc: BaseException) -> click.Group:
    @click.group(cls=WanGroup)
    def group() -> None:
        pass

    @group.command()
    def job() -> None:
        raise exc

    return group


def test_wan_error_becomes_one_line_and_exit_1():
    result = CliRunner().invoke(failing_group(InputError("--video_size must be a multiple of 16")), ["job"])
    assert result.exit_code == 1
    assert result.stderr == "error: --video_size must be a multiple of 16\n"
    assert result.stdout == ""


def test_multi_line_errors_are_indented():
    result = CliRunner().invoke(failing_group(WeightsError("bad file\nit looks like a VAE")), ["job"])
    assert result.stderr == "error: bad file\n  it looks like a VAE\n"


def test_wan_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("WAN_DEBUG", "1")
    result = CliRunner().invoke(failing_group(InputError("boom")), ["job"])
    assert isinstance(result.exception, InputError)
    monkeypatch.setenv("WAN_DEBUG", "0")
    assert CliRunner().invoke(failing_group(InputError("boom")), ["job"]).exit_code == 1


def test_broken_plugin_error_offers_its_traceback(monkeypatch):
    error = BrokenPluginError("attention implementation 'x' comes from wan-attention-x, which failed to load")
    error.plugin_traceback = "Traceback (most recent call last):\n  ImportError: libx.so\n"
    result = CliRunner().invoke(failing_group(error), ["job"])
    assert result.exit_code == 1
    assert "set WAN_DEBUG=1 to see the plugin's traceback" in result.stderr
    assert "Traceback" not in result.stderr
    monkeypatch.setenv("WAN_DEBUG", "1")
    result = CliRunner().invoke(failing_group(error), ["job"])
    assert "ImportError: libx.so" in result.stderr and result.exception is error


def test_decorator_works_outside_the_wan_group():
    @click.command()
    @handle_wan_errors
    def standalone() -> None:
        raise InputError("no prompt given")

    result = CliRunner().invoke(standalone, [])
    assert result.exit_code == 1 and result.stderr == "error: no prompt given\n"


def test_unexpected_exceptions_are_not_hidden():
    result = CliRunner().invoke(failing_group(ZeroDivisionError("bug")), ["job"])
    assert isinstance(result.exception, ZeroDivisionError)


def test_usage_errors_exit_2():
    result = CliRunner().invoke(cli, ["no-such-command"])
    assert result.exit_code == 2 and "No such command" in result.stderr
    result = CliRunner().invoke(cli, ["plugins", "--no-such-option"])
    assert result.exit_code == 2 and "No such option" in result.stderr


def test_real_process_has_no_traceback_for_user_errors():
    result = run_python(
        """
        import click
        from wan_cli.errors import WanGroup
        from wan_kernel.errors import InputError

        @click.group(cls=WanGroup)
        def wan():
            pass

        @wan.command()
        def job():
            raise InputError("the prompt file is empty")

        wan.main(["job"], prog_name="wan")
        """
    )
    assert result.returncode == 1
    assert result.stderr == "error: the prompt file is empty\n"


def test_cli_error_class_exit_code():
    assert WanCliError("x").exit_code == 1
    assert WanCliError("x", exit_code=3).exit_code == 3

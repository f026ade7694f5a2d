"""The plugin surface: discovery, selection, broken plugins, duplicates, switches, `wan plugins`.

Fake third-party distributions are written to a temporary folder as a module plus a
``<name>.dist-info`` with an ``entry_points.txt``, and that folder is put on ``sys.path`` (or
``PYTHONPATH`` for subprocesses): exactly what ``importlib.metadata`` sees after a real install,
without touching the virtual environment. One test really ``pip install``s the documented example
plugin (``plugins/attention_example``) into a temporary target folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from wan_cli.main import cli
from wan_kernel import hookimpl
from wan_kernel.errors import (
    BrokenPluginError,
    DuplicatePluginNameError,
    PluginUnavailableError,
    UnknownPluginError,
)
from wan_kernel.interfaces import AttentionBackend
from wan_kernel.plugins import LOAD_ENV, PluginManager, resolve

REPO = Path(__file__).resolve().parents[1]

BACKEND_SOURCE = """
from wan_kernel import hookimpl
from wan_kernel.interfaces import AttentionBackend, Availability


class FakeAttention(AttentionBackend):
    name = {name!r}
    aliases = {aliases!r}
    description = "a fake backend for tests"

    def availability(self):
        return Availability.yes() if {available!r} else Availability.no("needs a fake GPU")

    def __call__(self, q, k, v, k_lens=None):
        return q


@hookimpl
def wan_register_attention(register):
    register(FakeAttention())
"""


def backend_source(name: str, aliases: tuple[str, ...] = (), available: bool = True) -> str:
    return BACKEND_SOURCE.format(name=name, aliases=aliases, available=available)


def make_dist(root: Path, distribution: str, source: str, *, version: str = "1.2.3", entry_point: str | None = None):
    """Write a module and its dist-info under ``root``; return (entry-point name, module name)."""
    module = f"wan_fake_{uuid.uuid4().hex[:10]}"
    entry_point = entry_point or distribution.removeprefix("wan-").replace("-", "_")
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{distribution.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[wan_kernel]\n{entry_point} = {module}\n")
    return entry_point, module


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on ``sys.path`` for fake distributions; their modules are forgotten afterwards."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    before = set(sys.modules)
    yield root
    for name in set(sys.modules) - before:
        if name.startswith("wan_fake_"):
            del sys.modules[name]


def only(*names: str) -> dict[str, str]:
    return {LOAD_ENV: ",".join(names)}


def run_wan(args, *, pythonpath: Path | None = None, env: dict[str, str] | None = None):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("WAN_")}
    if pythonpath is not None:
        environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), environ.get("PYTHONPATH")]))
    environ.update(env or {})
    code = "import sys; from wan_cli.main import main; sys.argv[0] = 'wan'; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=environ, timeout=120
    )


# -- a third-party plugin ---------------------------------------------------------------------


def test_third_party_plugin_is_listed_and_selectable(site):
    make_dist(site, "wan-attention-thirdparty", backend_source("thirdparty", ("tp",)))
    manager = PluginManager(environ=only("wan-attention-thirdparty"))
    backend = resolve("attention", "thirdparty", manager=manager)
    assert type(backend).__name__ == "FakeAttention"
    assert manager.get("attention", "tp") is backend
    info = manager.describe()
    (plugin,) = info["plugins"]
    assert plugin["distribution"] == "wan-attention-thirdparty"
    assert plugin["version"] == "1.2.3"
    assert plugin["implementations"]["attention"][0] == {
        "name": "thirdparty",
        "aliases": ["tp"],
        "description": "a fake backend for tests",
        "available": True,
        "reason": "",
    }


def test_wan_plugins_lists_third_party_plugin(site, monkeypatch):
    make_dist(site, "wan-attention-thirdparty", backend_source("thirdparty", ("tp",)))
    make_dist(site, "wan-attention-nogpu", backend_source("nogpu", available=False))
    monkeypatch.setenv(LOAD_ENV, "attention_thirdparty,wan-attention-nogpu")
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    row = next(line for line in lines if line.strip().startswith("thirdparty"))
    assert "tp" in row and "yes" in row and "wan-attention-thirdparty 1.2.3" in row
    index = next(i for i, line in enumerate(lines) if line.strip().startswith("nogpu"))
    assert " no " in lines[index]
    assert lines[index + 1].strip() == "not available: needs a fake GPU"  # why not, under its row
    assert any("wan-attention-thirdparty" in line and "1 attention" in line for line in lines)

    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    by_name = {impl["name"]: impl for impl in info["concerns"]["attention"]}
    assert by_name["thirdparty"]["distribution"] == "wan-attention-thirdparty"
    assert by_name["thirdparty"]["available"] is True
    assert by_name["nogpu"]["available"] is False and by_name["nogpu"]["reason"] == "needs a fake GPU"
    with pytest.raises(PluginUnavailableError, match="needs a fake GPU"):
        PluginManager(environ=only("wan-attention-nogpu")).get("attention", "nogpu")


@pytest.mark.slow
def test_example_plugin_pip_installs_from_outside_the_repo(tmp_path):
    """The documented example, copied out of the repo and pip-installed, is found and conforms."""
    source = tmp_path / "src" / "wan-attention-example"
    shutil.copytree(REPO / "plugins" / "attention_example", source, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build"))
    target = tmp_path / "target"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--no-build-isolation", "--no-index", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    assert list(target.glob("wan_attention_example-0.1.0.dist-info/entry_points.txt"))

    listed = run_wan(["plugins", "--json"], pythonpath=target, env=only("wan-attention-example"))
    assert listed.returncode == 0, listed.stderr
    (plugin,) = json.loads(listed.stdout)["plugins"]
    assert (plugin["distribution"], plugin["version"]) == ("wan-attention-example", "0.1.0")
    assert plugin["implementations"]["attention"][0]["name"] == "example"
    assert plugin["implementations"]["attention"][0]["available"] is True

    env = {k: v for k, v in os.environ.items() if not k.startswith("WAN_")}
    env["PYTHONPATH"] = str(target)
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(source / "tests")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "2 passed" in tests.stdout  # conformance on CPU and selection by name (the CUDA one skips)


# -- broken plugins ---------------------------------------------------------------------------


BROKEN_ON_IMPORT = """
raise ImportError("libfake.so: cannot open shared object file")
"""


def test_plugin_that_fails_to_import_is_reported_not_fatal(site):
    make_dist(site, "wan-attention-crashy", BROKEN_ON_IMPORT)
    make_dist(site, "wan-attention-fine", backend_source("fine"))
    manager = PluginManager(environ=only("wan-attention-crashy", "wan-attention-fine"))
    assert manager.get("attention", "fine") is not None
    (broken,) = manager.broken()
    assert broken.distribution == "wan-attention-crashy"
    assert "ImportError: libfake.so" in broken.error
    assert "Traceback" in broken.traceback
    with pytest.raises(BrokenPluginError) as caught:
        manager.get("attention", "crashy")
    message = str(caught.value)
    assert "wan-attention-crashy 1.2.3" in message and "libfake.so" in message
    assert "WAN_DISABLE_PLUGINS=wan-attention-crashy" in message
    assert "Traceback" not in message  # kept apart, for WAN_DEBUG
    assert "Traceback" in caught.value.plugin_traceback
    # a name nobody provides mentions the broken plugin as a possible source
    with pytest.raises(UnknownPluginError, match="wan-attention-crashy"):
        manager.get("attention", "something_else")


def test_broken_plugin_in_the_cli(tmp_path):
    make_dist(tmp_path, "wan-attention-crashy", BROKEN_ON_IMPORT)
    make_dist(tmp_path, "wan-attention-fine", backend_source("fine"))
    env = only("wan-attention-crashy", "wan-attention-fine")

    help_ = run_wan(["--help"], pythonpath=tmp_path, env=env)
    assert help_.returncode == 0 and "plugins" in help_.stdout

    listed = run_wan(["plugins"], pythonpath=tmp_path, env=env)
    assert listed.returncode == 1
    assert "Traceback" not in listed.stdout + listed.stderr
    assert "broken plugins" in listed.stdout
    assert "wan-attention-crashy 1.2.3" in listed.stdout and "libfake.so" in listed.stdout
    assert any(line.strip().startswith("fine") for line in listed.stdout.splitlines())  # the rest still listed
    assert listed.stderr.startswith("error: 1 plugin(s) failed to load (wan-attention-crashy)")

    verbose = run_wan(["plugins", "--verbose"], pythonpath=tmp_path, env=env)
    assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stdout

    as_json = run_wan(["plugins", "--json"], pythonpath=tmp_path, env=env)
    assert as_json.returncode == 1
    info = json.loads(as_json.stdout)
    assert [b["distribution"] for b in info["broken"]] == ["wan-attention-crashy"]


def test_plugin_calling_sys_exit_at_import_does_not_end_the_command(tmp_path):
    """`sys.exit()` in a plugin module used to end every `wan` command silently (exit 0)."""
    make_dist(tmp_path, "wan-attention-quitter", "import sys\nsys.exit(0)\n")
    make_dist(tmp_path, "wan-attention-fine", backend_source("fine"))
    listed = run_wan(["plugins"], pythonpath=tmp_path, env=only("wan-attention-quitter", "wan-attention-fine"))
    assert listed.returncode == 1, listed.stdout + listed.stderr
    assert "wan-attention-quitter" in listed.stdout and "sys.exit(0)" in listed.stdout
    assert any(line.strip().startswith("fine") for line in listed.stdout.splitlines())
    assert "Traceback" not in listed.stdout + listed.stderr


def test_a_plugin_squatting_a_built_in_name_is_the_one_to_remove(site):
    make_dist(site, "wan-attention-squatter", backend_source("sdpa"))
    manager = PluginManager(environ=only("wan-attention-squatter", "wan-attention-sdpa"))
    with pytest.raises(DuplicatePluginNameError) as caught:
        manager.get("attention", "sdpa")
    message = str(caught.value)
    assert "built into wan (wan-attention-sdpa)" in message
    assert "pip uninstall wan-attention-squatter" in message
    assert "WAN_DISABLE_PLUGINS=wan-attention-squatter" in message
    assert "uninstall wan-attention-sdpa" not in message and "WAN_DISABLE_PLUGINS=wan-attention-sdpa" not in message


@pytest.mark.parametrize(
    "source, expected",
    [
        pytest.param(
            """
            from wan_kernel import hookimpl

            @hookimpl
            def wan_register_atention(register):
                pass
            """,
            "implements unknown hook(s) wan_register_atention",
            id="misspelled-hook",
        ),
        pytest.param(
            """
            def wan_register_attention(register):
                pass
            """,
            "defines wan_register_attention but it is not marked @wan_kernel.hookimpl",
            id="unmarked-hook",
        ),
        pytest.param("x = 1\n", "implements no hook", id="no-hook"),
        pytest.param(
            """
            from wan_kernel import hookimpl

            @hookimpl
            def wan_register_attention(reg):
                pass
            """,
            "wrong signature",
            id="wrong-parameter-name",
        ),
        pytest.param(
            """
            from wan_kernel import hookimpl

            class NoAvailability:
                name = "bad"
                def __call__(self, q, k, v, k_lens=None):
                    return q

            @hookimpl
            def wan_register_attention(register):
                register(NoAvailability())
            """,
            "lacks availability",
            id="not-an-implementation",
        ),
        pytest.param(
            """
            from wan_kernel import hookimpl
            from wan_kernel.interfaces import CfgSchedule

            class Sched(CfgSchedule):
                name = "never"
                def applies(self, step, num_steps, apply_ratio):
                    return False

            @hookimpl
            def wan_register_attention(register):
                register(Sched())  # a CFG schedule is not an attention backend
            """,
            "lacks __call__",
            id="wrong-concern",
        ),
    ],
)
def test_faulty_plugin_is_reported_broken(site, source, expected):
    make_dist(site, "wan-attention-faulty", source)
    manager = PluginManager(environ=only("wan-attention-faulty"))
    (broken,) = manager.broken()
    assert expected in broken.error
    assert manager.names("attention") == []


def test_plugin_failing_in_one_hook_keeps_none_of_its_registrations(site):
    make_dist(
        site,
        "wan-cfg-halfway",
        """
        from wan_kernel import hookimpl
        from wan_kernel.interfaces import AttentionBackend, CfgSchedule

        class Attn(AttentionBackend):
            name = "halfway_attn"
            def __call__(self, q, k, v, k_lens=None):
                return q

        @hookimpl
        def wan_register_attention(register):
            register(Attn())

        @hookimpl
        def wan_register_cfg_schedule(register):
            raise RuntimeError("schedule table corrupt")
        """,
    )
    manager = PluginManager(environ=only("wan-cfg-halfway"))
    (broken,) = manager.broken()
    assert "wan_register_cfg_schedule failed: RuntimeError: schedule table corrupt" in broken.error
    assert "halfway_attn" not in manager.names("attention")
    assert manager.describe()["plugins"][0]["broken"] is True


# -- duplicate names --------------------------------------------------------------------------


def test_duplicate_names_name_both_distributions(site):
    make_dist(site, "wan-attention-first", backend_source("shared_name"))
    make_dist(site, "wan-attention-second", backend_source("other", ("shared_name",)))
    manager = PluginManager(environ=only("wan-attention-first", "wan-attention-second"))
    with pytest.raises(DuplicatePluginNameError) as caught:
        manager.get("attention", "shared_name")
    message = str(caught.value)
    assert "wan-attention-first" in message and "wan-attention-second" in message
    assert "WAN_DISABLE_PLUGINS=" in message
    assert manager.get("attention", "other") is not None  # the clash does not hide other names

    info = manager.describe()
    (duplicate,) = info["duplicates"]
    assert duplicate["distributions"] == ["wan-attention-first", "wan-attention-second"]
    assert (duplicate["concern"], duplicate["name"]) == ("attention", "shared_name")


def test_wan_plugins_exits_1_on_duplicates(site, monkeypatch):
    make_dist(site, "wan-attention-first", backend_source("shared_name"))
    make_dist(site, "wan-attention-second", backend_source("shared_name"))
    monkeypatch.setenv(LOAD_ENV, "wan-attention-first,wan-attention-second")
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 1
    assert "duplicate names" in result.stdout
    assert "registered twice: by wan-attention-first and by wan-attention-second" in result.stdout
    assert result.stderr.startswith("error: 1 name(s) registered twice (attention 'shared_name')")
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback


# -- unknown names ----------------------------------------------------------------------------


class _OnlySdpaNames:
    """A plugin object (not a module) registering one backend named ``sdpa`` with alias ``torch``."""

    @hookimpl
    def wan_register_attention(self, register):
        class Sdpa(AttentionBackend):
            name, aliases = "sdpa", ("torch",)

            def __call__(self, q, k, v, k_lens=None):
                return q

        register(Sdpa())


def test_unknown_first_party_name_says_what_to_install():
    # no entry points: whatever the venv has installed, xformers is not there
    manager = PluginManager(load_entry_points=False, extra_plugins=[("only_sdpa", _OnlySdpaNames())])
    with pytest.raises(UnknownPluginError) as caught:
        manager.get("attention", "xformers")
    message = str(caught.value)
    assert "unknown attention implementation 'xformers'" in message
    assert "known: sdpa, torch" in message
    assert "pip install wan-attention-xformers" in message
    assert caught.value.known == ["sdpa", "torch"]


def test_unknown_name_lists_alternatives(site):
    make_dist(site, "wan-attention-thirdparty", backend_source("thirdparty", ("tp",)))
    manager = PluginManager(environ=only("wan-attention-thirdparty"))
    with pytest.raises(UnknownPluginError, match=r"'nonesuch'; known: thirdparty, tp\. Run `wan plugins`"):
        manager.get("attention", "nonesuch")
    assert manager.get("attention", "ThirdParty") is manager.get("attention", "thirdparty")  # case-insensitive


def test_unknown_name_of_a_disabled_plugin_says_it_was_skipped():
    manager = PluginManager(environ={"WAN_DISABLE_PLUGINS": "wan-attention-sdpa"})
    with pytest.raises(UnknownPluginError, match=r"wan-attention-sdpa is installed but was skipped \(listed in WAN_DISABLE_PLUGINS\)"):
        manager.get("attention", "sdpa")


# -- environment switches ---------------------------------------------------------------------


def test_load_plugins_switch(site):
    make_dist(site, "wan-attention-alpha", backend_source("alpha"))
    make_dist(site, "wan-attention-beta", backend_source("beta"))
    manager = PluginManager(environ=only("attention_alpha"))  # entry-point name works too
    assert manager.names("attention") == ["alpha"]
    skipped = {s.distribution: s.reason for s in manager.skipped}
    assert skipped["wan-attention-beta"] == "not listed in WAN_LOAD_PLUGINS"
    assert "wan-attention-sdpa" in skipped

    assert PluginManager(environ={LOAD_ENV: ""}).records == []  # empty: load none


def test_disable_plugins_switch(site, monkeypatch):
    make_dist(site, "wan-attention-alpha", backend_source("alpha"))
    make_dist(site, "wan-attention-beta", backend_source("beta"))
    monkeypatch.setenv(LOAD_ENV, "wan-attention-alpha,wan-attention-beta")
    monkeypatch.setenv("WAN_DISABLE_PLUGINS", " WAN_Attention_Beta ")  # case, _ and spaces do not matter
    manager = PluginManager()
    assert manager.names("attention") == ["alpha"]
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    info = json.loads(result.stdout)
    assert info["switches"]["WAN_DISABLE_PLUGINS"] == ["wan-attention-beta"]
    assert [s["distribution"] for s in info["skipped"] if "DISABLE" in s["reason"]] == ["wan-attention-beta"]
    assert [p["distribution"] for p in info["plugins"]] == ["wan-attention-alpha"]

"""The layering as a checked fact: walk every import of the source files (ast) and fail when

- a model module (``wan_kernel.models``) imports the plugin manager, the pipelines, the CLI or
  ``wan_kernel.lora``;
- a sampler module (``wan_kernel.sampling``) imports the models;
- a plugin under ``plugins/`` imports a kernel module ``docs/plugins.md`` does not list as public.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNEL = REPO / "wan_kernel"
DOC = REPO / "docs" / "plugins.md"


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    base = REPO.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imported_modules(source: str, *, package: str = "") -> set[str]:
    """Every module a source file imports, anywhere in it (function-level imports included).

    ``from pkg import name`` counts as ``pkg.name`` when that is a module of this repository;
    relative imports are resolved against ``package``.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, *([base] if base else [])])
            found.add(base)
            for alias in node.names:
                if _is_module(f"{base}.{alias.name}"):
                    found.add(f"{base}.{alias.name}")
    return found


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def violations(files, forbidden: tuple[str, ...], root: Path = REPO) -> list[str]:
    out = []
    for path in files:
        name = module_name(path, root)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for module in sorted(imported_modules(path.read_text(encoding="utf-8"), package=package)):
            if _within(module, forbidden):
                out.append(f"{path.relative_to(REPO)} imports {module}")
    return out


def public_kernel_modules() -> set[str]:
    """The modules listed in the first column of docs/plugins.md's "Helpers for plugin authors" table."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Helpers for plugin authors", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(wan_kernel[\w.]*)` \|", section, flags=re.MULTILINE))


def allowed_for_plugins(module: str, public: set[str]) -> bool:
    if module in public:
        return True
    # a public package (other than the root) opens its submodules: wan_kernel.testing.attention
    packages = [p for p in public if p != "wan_kernel" and (REPO / p.replace(".", "/")).is_dir()]
    return any(module.startswith(p + ".") for p in packages)


def test_model_modules_import_neither_plugins_nor_pipelines_nor_cli():
    files = sorted((KERNEL / "models").rglob("*.py"))
    assert len(files) > 5
    assert violations(files, ("wan_kernel.plugins", "wan_kernel.pipelines", "wan_cli", "cli")) == []


def test_model_modules_do_not_import_the_lora_package():
    """LoRAs reach the loader as a state-dict transform; wan_kernel.lora imports the models, not back."""
    files = sorted((KERNEL / "models").rglob("*.py"))
    assert violations(files, ("wan_kernel.lora",)) == []


def test_samplers_do_not_import_the_models():
    files = sorted((KERNEL / "sampling").rglob("*.py"))
    assert len(files) > 3
    assert violations(files, ("wan_kernel.models",)) == []


def plugin_sources() -> list[Path]:
    return sorted(
        p
        for p in (REPO / "plugins").rglob("*.py")
        if "tests" not in p.relative_to(REPO / "plugins").parts and ".egg-info" not in str(p)
    )


def test_plugins_import_only_public_kernel_modules():
    public = public_kernel_modules()
    assert {"wan_kernel", "wan_kernel.interfaces", "wan_kernel.errors"} <= public
    files = plugin_sources()
    assert len(files) > 8
    bad = []
    for path in files:
        for module in sorted(imported_modules(path.read_text(encoding="utf-8"))):
            if _within(module, ("wan_kernel",)) and not allowed_for_plugins(module, public):
                bad.append(f"{path.relative_to(REPO)} imports {module}, which docs/plugins.md does not list")
    assert bad == []


@pytest.mark.parametrize(
    "source, forbidden, caught",
    [
        (
            "def f():\n    from wan_kernel.plugins import resolve\n",
            ("wan_kernel.plugins",),
            "wan_kernel.plugins",
        ),
        ("from wan_kernel import plugins\n", ("wan_kernel.plugins",), "wan_kernel.plugins"),
        (
            "import wan_kernel.pipelines.generate\n",
            ("wan_kernel.pipelines",),
            "wan_kernel.pipelines.generate",
        ),
        ("from ..models import dit\n", ("wan_kernel.models",), "wan_kernel.models"),
    ],
)
def test_the_walk_sees_every_form_of_import(tmp_path, source, forbidden, caught):
    """The checker itself: imports inside functions, of submodules by name, and relative ones."""
    found = imported_modules(source, package="wan_kernel.sampling")
    assert caught in found
    assert any(_within(m, forbidden) for m in found)


def test_an_unlisted_kernel_module_is_refused_for_plugins():
    public = public_kernel_modules()
    assert allowed_for_plugins("wan_kernel.testing.attention", public)
    assert not allowed_for_plugins("wan_kernel.pipelines.generate", public)
    assert not allowed_for_plugins("wan_kernel.plugins", public)


# --------------------------------------------------------------------------------------------
# Kernel tests reach plugins only through wan_kernel.plugins
# --------------------------------------------------------------------------------------------

DYNAMIC_IMPORTS = ("importorskip", "import_module", "find_spec", "__import__")


def plugin_packages() -> set[str]:
    """The top-level modules the plugins ship: ``py-modules`` and ``packages`` of each
    ``plugins/*/pyproject.toml`` ([tool.setuptools])."""
    found: set[str] = set()
    for pyproject in sorted((REPO / "plugins").glob("*/pyproject.toml")):
        setuptools = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["setuptools"]
        found.update(setuptools.get("py-modules", []), setuptools.get("packages", []))
    return {name.split(".")[0] for name in found}


def imported_by_test(source: str) -> set[str]:
    """The modules a test file imports: import statements plus a literal name handed to
    ``pytest.importorskip``, ``importlib.import_module``, ``importlib.util.find_spec`` or ``__import__``."""
    found = imported_modules(source, package="tests")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in DYNAMIC_IMPORTS and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def plugin_imports_in_tests(files, packages: set[str], root: Path = REPO) -> list[str]:
    return [
        f"{path.relative_to(root)} imports {module}"
        for path in files
        for module in sorted(imported_by_test(path.read_text(encoding="utf-8")))
        if _within(module, tuple(packages))
    ]


def test_kernel_tests_import_no_plugin_package():
    """A kernel test that needs an implementation resolves it (``wan_kernel.testing.plugin_or_skip``,
    ``wan_kernel.plugins.resolve``); a test about a plugin lives in ``plugins/<name>/tests/``."""
    packages = plugin_packages()
    assert {"wan_quant_fp8", "wan_attention_sdpa", "wan_offload_blockswap"} <= packages
    files = sorted((REPO / "tests").rglob("*.py"))
    assert len(files) > 10
    assert plugin_imports_in_tests(files, packages) == []


@pytest.mark.parametrize(
    "source",
    [
        "from wan_quant_fp8.scheme import SCHEMES\n",
        "def test():\n    import wan_attention_sdpa\n",
        "import pytest\npytest.importorskip('wan_quant_fp8')\n",
        "import importlib.util\nimportlib.util.find_spec('wan_cfg_schedules')\n",
    ],
)
def test_the_test_check_catches_a_plugin_import(tmp_path, source):
    """The check itself: statements, function-level imports and the dynamic forms; a resolve is fine."""
    (tmp_path / "test_bad.py").write_text(source, encoding="utf-8")
    (tmp_path / "test_good.py").write_text(
        "from wan_kernel.testing import plugin_or_skip\nplugin_or_skip('quantization', 'fp8_scaled')\n",
        encoding="utf-8",
    )
    files = sorted(tmp_path.glob("*.py"))
    found = plugin_imports_in_tests(files, plugin_packages(), root=tmp_path)
    assert len(found) == 1 and found[0].startswith("test_bad.py imports wan_"), found


def test_plugin_or_skip_resolves_or_skips():
    from wan_kernel.plugins import resolve
    from wan_kernel.testing import plugin_or_skip

    assert plugin_or_skip("attention", "sdpa") is resolve("attention", "sdpa")
    with pytest.raises(pytest.skip.Exception, match="not usable here"):
        plugin_or_skip("attention", "no-such-backend")

"""docs/plugins.md documents the plugin surface exactly: hooks, interfaces, fixtures, the example."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from wan_kernel import hookspecs, interfaces
from wan_kernel.attention_kernels import KernelAttention
from wan_kernel.plugins import DISABLE_ENV, ENTRY_POINT_GROUP, LOAD_ENV

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "plugins.md"
EXAMPLE = REPO / "plugins" / "attention_example"


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _annotation(annotation: object) -> str:
    # modules use `from __future__ import annotations`: annotations are their source text
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def signature_text(name: str, func, *, drop_self: bool = False) -> str:
    """``name(param: annotation = default, *, ...) -> return`` as written in the source."""
    signature = inspect.signature(func)
    params = list(signature.parameters.values())[1 if drop_self else 0 :]
    parts, star = [], False
    for param in params:
        if param.kind is param.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        text = param.name
        if param.annotation is not param.empty:
            text += ": " + _annotation(param.annotation).replace('"', "").replace("'", "")
        if param.default is not param.empty:
            text += (" = " if param.annotation is not param.empty else "=") + repr(param.default)
        parts.append(text)
    text = f"{name}({', '.join(parts)})"
    if signature.return_annotation is not signature.empty:
        text += " -> " + _annotation(signature.return_annotation).replace('"', "").replace("'", "")
    return text


@pytest.mark.parametrize("concern, hook", sorted(hookspecs.REGISTRY_HOOKS.items()))
def test_every_hook_is_documented_with_its_signature(doc, concern, hook):
    spec = getattr(hookspecs, hook)
    expected = signature_text(hook, spec)
    assert f"`{expected}`" in doc, f"docs/plugins.md lacks the exact signature {expected}"
    assert f"`{concern}`" in doc


@pytest.mark.parametrize("hook", sorted(hookspecs.REGISTRY_HOOKS.values()))
def test_every_hookspec_has_a_docstring_with_params(hook):
    spec = getattr(hookspecs, hook)
    docstring = inspect.getdoc(spec) or ""
    assert docstring, f"{hook} has no docstring"
    for name in inspect.signature(spec).parameters:
        assert f":param {name}:" in docstring, f"{hook} does not document its parameter {name!r}"


def test_every_hookspec_is_a_registry_hook():
    specs = {name for name, value in vars(hookspecs).items() if name.startswith("wan_") and callable(value)}
    assert specs == set(hookspecs.REGISTRY_HOOKS.values())
    assert set(hookspecs.REGISTRY_HOOKS) == set(interfaces.CONCERNS)


INTERFACES = [*interfaces.CONCERNS.values(), interfaces.BlockRunner, KernelAttention]


@pytest.mark.parametrize("cls", INTERFACES, ids=lambda c: c.__name__)
def test_every_interface_method_is_documented(doc, cls):
    assert f"### `{cls.__name__}`" in doc or f"`{cls.__name__}` and" in doc or f"and `{cls.__name__}`" in doc
    for name, member in vars(cls).items():
        if not callable(member) or (name.startswith("_") and name != "__call__"):
            continue
        expected = signature_text(name, member, drop_self=True)
        assert f"`{expected}`" in doc or f"`{cls.__name__}.{expected}`" in doc, (
            f"docs/plugins.md lacks {cls.__name__}.{expected}"
        )


def test_implementation_base_is_documented(doc):
    for member in ("name", "aliases", "description", "install_hint"):
        assert f"`{member}: ClassVar" in doc
    assert f"`{signature_text('availability', interfaces.Implementation.availability, drop_self=True)}`" in doc


def test_discovery_switches_and_fixtures_are_documented(doc):
    for text in (
        f"`{ENTRY_POINT_GROUP}`",
        "`wan-<concern>-<impl>`",
        f"`{LOAD_ENV}`",
        f"`{DISABLE_ENV}`",
        "`WAN_DEBUG`",
        "fixture `attention_conformance`",
        "fixture `cuda_device`",
        "marker `cuda`",
        "wan plugins --json",
    ):
        assert text in doc, f"docs/plugins.md does not mention {text}"


EXAMPLE_BLOCK = re.compile(r'^```(\w+) title="([^"]+)"\n(.*?)^```$', re.MULTILINE | re.DOTALL)


def test_example_plugin_in_the_doc_is_the_template_verbatim(doc):
    blocks = {title: body for _, title, body in EXAMPLE_BLOCK.findall(doc)}
    files = sorted(
        p.relative_to(REPO).as_posix()
        for p in EXAMPLE.rglob("*")
        if p.is_file() and p.suffix in (".py", ".toml") and "egg-info" not in p.as_posix() and "__pycache__" not in p.parts
    )
    assert files, "plugins/attention_example is empty"
    assert sorted(blocks) == files, "the doc's example blocks and plugins/attention_example differ in files"
    for path in files:
        assert blocks[path] == (REPO / path).read_text(encoding="utf-8"), f"docs/plugins.md's copy of {path} differs"


def test_example_follows_the_naming_contract():
    text = (EXAMPLE / "pyproject.toml").read_text()
    assert 'name = "wan-attention-example"' in text  # wan-<folder with _ as ->
    assert f"[project.entry-points.{ENTRY_POINT_GROUP}]" in text

"""Plugin discovery and the per-concern implementation tables.

Plugins are entry points in the group ``wan_kernel``. Each is loaded on its own: one that fails
to import, implements a hook that does not exist, or raises while registering is recorded as
broken (with its traceback) and only becomes an error when the user selects something it would
have provided. Every loaded plugin's registry hooks are called once, with a ``register`` callable
that knows which distribution is registering, so duplicate names are reported with both culprits.
A plugin whose hooks fail keeps none of its registrations.

Environment switches (comma-separated entry-point or distribution names; ``-`` and ``_`` and
case do not matter):

- ``WAN_LOAD_PLUGINS``: load only these plugins (set it empty to load none).
- ``WAN_DISABLE_PLUGINS``: skip these plugins.

This module does not import torch; availability probes of the plugins may.
"""

from __future__ import annotations

import importlib.metadata as importlib_metadata
import inspect
import os
import traceback
from typing import Any, Callable, Iterable, Mapping

import attrs
import pluggy

from wan_kernel import PROJECT_NAME, hookspecs
from wan_kernel.errors import (
    BrokenPluginError,
    DuplicatePluginNameError,
    PluginUnavailableError,
    UnknownPluginError,
)
from wan_kernel.interfaces import CONCERNS, Availability

ENTRY_POINT_GROUP = PROJECT_NAME
LOAD_ENV = "WAN_LOAD_PLUGINS"
DISABLE_ENV = "WAN_DISABLE_PLUGINS"

FIRST_PARTY_PROVIDERS: dict[tuple[str, str], str] = {
    ("attention", "sdpa"): "wan-attention-sdpa",
    ("attention", "torch"): "wan-attention-sdpa",
    ("attention", "xformers"): "wan-attention-xformers",
    ("attention", "sageattn"): "wan-attention-sage",
    ("attention", "flash"): "wan-attention-flash",
    ("attention", "flash2"): "wan-attention-flash",
    ("attention", "flash3"): "wan-attention-flash",
    ("quantization", "fp8"): "wan-quant-fp8",
    ("quantization", "fp8_scaled"): "wan-quant-fp8",
    ("quantization", "fp8_fast"): "wan-quant-fp8",
    ("offload", "blockswap"): "wan-offload-blockswap",
}
"""Names our own plugin distributions provide, for install hints when one is not installed."""

CONCERN_DISTRIBUTIONS: dict[str, str] = {
    "cfg_schedule": "wan-cfg-schedules",
    "timestep_sampling": "wan-timestep-sampling",
}
"""First-party distributions that provide every implementation of a concern."""


def is_first_party(distribution: str) -> bool:
    """Whether ``distribution`` is one of wan's own (the kernel or a plugin it ships)."""
    ours = {PROJECT_NAME, "wan", *FIRST_PARTY_PROVIDERS.values(), *CONCERN_DISTRIBUTIONS.values()}
    return _normalise(distribution) in {_normalise(d) for d in ours}


def _describe_failure(exc: BaseException) -> str:
    """``Type: message``; ``sys.exit`` gets its own words (it would otherwise end every command)."""
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r}) (a plugin must raise an exception instead of exiting)"
    return f"{type(exc).__name__}: {exc}"


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _split_env(value: str | None) -> set[str] | None:
    if value is None:
        return None
    return {_normalise(part) for part in value.split(",") if part.strip()}


def _install_hint(distribution: str) -> str:
    folder = distribution.removeprefix("wan-").replace("-", "_")
    return f"pip install {distribution} (or, from a checkout, pip install -e plugins/{folder})"


def _provider_distributions(concern: str, name: str) -> set[str]:
    """Normalised names of the distributions that would provide ``name`` (lower-case, stripped):
    its first-party provider, the concern's own distribution, and ``wan-<concern>-<name>``."""
    candidates = (FIRST_PARTY_PROVIDERS.get((concern, name)), CONCERN_DISTRIBUTIONS.get(concern))
    return {_normalise(d) for d in (*candidates, f"wan-{concern}-{name}") if d}


@attrs.define
class PluginRecord:
    """One discovered plugin (an entry point), loaded or broken."""

    name: str
    distribution: str
    version: str
    module: str
    error: str | None = None
    traceback: str | None = None

    @property
    def broken(self) -> bool:
        return self.error is not None

    @property
    def label(self) -> str:
        """``distribution version`` as shown to users."""
        return f"{self.distribution} {self.version}".strip()


@attrs.frozen
class SkippedPlugin:
    """An entry point that a switch (``WAN_LOAD_PLUGINS``/``WAN_DISABLE_PLUGINS``) left out."""

    name: str
    distribution: str
    version: str
    reason: str


@attrs.frozen
class Registered:
    """One registered implementation and where it came from."""

    concern: str
    impl: Any
    plugin: str
    distribution: str
    version: str = ""

    @property
    def name(self) -> str:
        return self.impl.name

    @property
    def aliases(self) -> tuple[str, ...]:
        return tuple(getattr(self.impl, "aliases", ()) or ())

    def availability(self) -> Availability:
        try:
            result = self.impl.availability()
        except BaseException as exc:  # noqa: BLE001 - an availability probe must never crash discovery
            if isinstance(exc, KeyboardInterrupt):
                raise
            return Availability.no(f"availability check failed: {_describe_failure(exc)}")
        if isinstance(result, Availability):
            return result
        ok, reason = result if isinstance(result, tuple) else (bool(result), "")
        return Availability(bool(ok), str(reason))


class _PluginFailure(Exception):
    """Internal: a plugin module is unusable; the message says why."""


class PluginManager:
    """Discovers plugins and keeps one implementation table per concern.

    ``records`` lists every loaded or broken plugin in discovery order, ``skipped`` the entry
    points the environment switches left out, ``tables[concern]`` maps names to
    :class:`Registered`, ``aliases[concern]`` maps aliases to names, and ``duplicates`` holds one
    :class:`~wan_kernel.errors.DuplicatePluginNameError` per clash (the first registration keeps
    the name in the table, but selecting a clashing name raises the error).
    """

    def __init__(
        self,
        *,
        load_entry_points: bool = True,
        extra_plugins: Iterable[tuple[str, object]] = (),
        environ: Mapping[str, str] | None = None,
    ):
        environ = os.environ if environ is None else environ
        self._only = _split_env(environ.get(LOAD_ENV))
        self._disabled = _split_env(environ.get(DISABLE_ENV)) or set()
        self._pm = pluggy.PluginManager(PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self.records: list[PluginRecord] = []
        self.skipped: list[SkippedPlugin] = []
        self.tables: dict[str, dict[str, Registered]] = {concern: {} for concern in CONCERNS}
        self.aliases: dict[str, dict[str, str]] = {concern: {} for concern in CONCERNS}
        self.duplicates: list[DuplicatePluginNameError] = []
        self._modules: dict[int, object] = {}  # id(record) -> loaded module
        if load_entry_points:
            self._load_entry_points()
        for name, module in extra_plugins:
            record = PluginRecord(name, name, "", getattr(module, "__name__", name))
            self._register_module(module, record)
        self._collect()

    # -- discovery ----------------------------------------------------------------------------

    def _skip_reason(self, entry_point_name: str, distribution: str) -> str | None:
        names = {_normalise(entry_point_name), _normalise(distribution)}
        if self._only is not None and not names & self._only:
            return f"not listed in {LOAD_ENV}"
        if names & self._disabled:
            return f"listed in {DISABLE_ENV}"
        return None

    def _load_entry_points(self) -> None:
        seen: set[tuple[str, str]] = set()
        for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist
            dist_name = (dist.metadata["Name"] if dist is not None else None) or "unknown"
            version = (dist.version if dist is not None else None) or ""
            key = (_normalise(dist_name), ep.name)
            if key in seen:  # the same distribution found twice on sys.path: the first one wins
                continue
            seen.add(key)
            reason = self._skip_reason(ep.name, dist_name)
            if reason is not None:
                self.skipped.append(SkippedPlugin(ep.name, dist_name, version, reason))
                continue
            record = PluginRecord(ep.name, dist_name, version, ep.value)
            try:
                module = ep.load()
            except BaseException as exc:  # noqa: BLE001 - a broken plugin must not stop discovery
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self._mark_broken(record, f"failed to import {ep.value}: {_describe_failure(exc)}")
                self.records.append(record)
                continue
            self._register_module(module, record)

    def _mark_broken(self, record: PluginRecord, message: str) -> None:
        record.error = message
        record.traceback = traceback.format_exc()

    def _register_module(self, module: object, record: PluginRecord) -> None:
        self.records.append(record)
        plugin_name = f"{record.distribution}:{record.name}:{len(self.records)}"
        try:
            self._check_unmarked_hooks(module)
            try:
                self._pm.register(module, name=plugin_name)
            except pluggy.PluginValidationError as exc:
                raise _PluginFailure(f"has a hook with the wrong signature: {exc}") from exc
            except ValueError as exc:  # the same module under two entry points
                raise _PluginFailure(str(exc).splitlines()[0]) from exc
            callers = self._pm.get_hookcallers(module) or []
            unknown = sorted(c.name for c in callers if not c.has_spec())
            if unknown:
                self._pm.unregister(module)
                raise _PluginFailure(
                    f"implements unknown hook(s) {', '.join(unknown)}; known hooks: "
                    + ", ".join(hookspecs.REGISTRY_HOOKS.values())
                )
            if not callers:
                self._pm.unregister(module)
                raise _PluginFailure(
                    "implements no hook: mark functions named after a hook ("
                    + ", ".join(hookspecs.REGISTRY_HOOKS.values())
                    + ") with @wan_kernel.hookimpl"
                )
            wrappers = sorted(c.name for c in callers for i in c.get_hookimpls() if i.plugin is module and (i.hookwrapper or i.wrapper))
            if wrappers:
                self._pm.unregister(module)
                raise _PluginFailure(f"registry hooks cannot be wrappers: {', '.join(wrappers)}")
        except _PluginFailure as exc:
            self._mark_broken(record, str(exc))
            return
        except Exception as exc:  # anything else pluggy raises while registering
            self._mark_broken(record, f"{type(exc).__name__}: {exc}")
            return
        self._modules[id(record)] = module

    @staticmethod
    def _check_unmarked_hooks(module: object) -> None:
        marker = PROJECT_NAME + "_impl"
        for hook_name in hookspecs.REGISTRY_HOOKS.values():
            attr = inspect.getattr_static(module, hook_name, None)
            if callable(attr) and not hasattr(attr, marker):
                raise _PluginFailure(f"defines {hook_name} but it is not marked @wan_kernel.hookimpl")

    def _collect(self) -> None:
        """Call each loaded plugin's registry hooks; keep its registrations only if all succeed."""
        for record in self.records:
            module = self._modules.get(id(record))
            if module is None or record.broken:
                continue
            staged: list[tuple[str, object]] = []
            for concern, hook_name in hookspecs.REGISTRY_HOOKS.items():
                for hookimpl in getattr(self._pm.hook, hook_name).get_hookimpls():
                    if hookimpl.plugin is not module:
                        continue
                    register = self._make_register(concern, staged)
                    try:
                        hookimpl.function(*[register for _ in hookimpl.argnames])
                    except BaseException as exc:  # noqa: BLE001 - sys.exit in a hook is a broken plugin too
                        if isinstance(exc, KeyboardInterrupt):
                            raise
                        self._mark_broken(record, f"{hook_name} failed: {_describe_failure(exc)}")
                        break
                if record.broken:
                    break
            if record.broken:
                self._pm.unregister(module)
                continue
            for concern, impl in staged:
                self._add(concern, impl, record)

    def _make_register(self, concern: str, staged: list[tuple[str, object]]) -> Callable[[object], None]:
        interface = CONCERNS[concern]
        required = sorted(getattr(interface, "__abstractmethods__", ()))

        def register(impl: object) -> None:
            name = getattr(impl, "name", None)
            if not isinstance(name, str) or not name.strip():
                raise TypeError(f"{concern} implementation {impl!r} has no string `name`")
            missing = [m for m in ("availability", *required) if not callable(getattr(impl, m, None))]
            if missing:
                raise TypeError(
                    f"{concern} implementation {name!r} lacks {', '.join(missing)} "
                    f"(subclass wan_kernel.interfaces.{interface.__name__})"
                )
            aliases = getattr(impl, "aliases", ()) or ()
            if isinstance(aliases, str) or not all(isinstance(a, str) and a for a in aliases):
                raise TypeError(f"{concern} implementation {name!r}: `aliases` must be a tuple of strings")
            staged.append((concern, impl))

        return register

    def _add(self, concern: str, impl: Any, record: PluginRecord) -> None:
        entry = Registered(concern, impl, record.name, record.distribution, record.version)
        for key in dict.fromkeys((entry.name, *entry.aliases)):
            existing = self._owner(concern, key)
            if existing is not None:
                builtin = next(
                    (d for d in (existing.distribution, record.distribution) if is_first_party(d)), None
                )
                self.duplicates.append(
                    DuplicatePluginNameError(
                        concern, key, existing.distribution, record.distribution, builtin=builtin
                    )
                )
            elif key == entry.name:
                self.tables[concern][key] = entry
            else:
                self.aliases[concern][key] = entry.name

    def _owner(self, concern: str, key: str) -> Registered | None:
        if key in self.tables[concern]:
            return self.tables[concern][key]
        target = self.aliases[concern].get(key)
        return self.tables[concern].get(target) if target else None

    # -- queries ------------------------------------------------------------------------------

    def implementations(self, concern: str) -> list[Registered]:
        """Every registered implementation of ``concern``, in registration order."""
        self._check_concern(concern)
        return list(self.tables[concern].values())

    def names(self, concern: str) -> list[str]:
        """Every name (and alias) that selects an implementation of ``concern``."""
        self._check_concern(concern)
        return sorted([*self.tables[concern], *self.aliases[concern]])

    def broken(self) -> list[PluginRecord]:
        """The plugins that failed to import or to register, in discovery order."""
        return [r for r in self.records if r.broken]

    def lookup(self, concern: str, name: str) -> Registered:
        """The registration selected by ``name``, available or not.

        Raises :class:`DuplicatePluginNameError` when two plugins claim ``name``,
        :class:`BrokenPluginError` when the plugin that would provide it failed to load, and
        :class:`UnknownPluginError` (with the known names and an install hint) otherwise.
        """
        self._check_concern(concern)
        if not isinstance(name, str) or not name.strip():
            raise UnknownPluginError(concern, repr(name), self.names(concern))
        candidates = list(dict.fromkeys((name, name.strip().lower())))
        for duplicate in self.duplicates:
            if duplicate.concern == concern and duplicate.name in candidates:
                raise duplicate
        for key in candidates:
            entry = self._owner(concern, key)
            if entry is not None:
                return entry
        broken = self._broken_provider(concern, name.strip().lower())
        if broken is not None:
            error = BrokenPluginError(
                f"{concern} implementation {name!r} comes from {broken.label}, which failed to load: "
                f"{broken.error}. Reinstall or fix it (pip install --force-reinstall {broken.distribution}), "
                f"or disable it with {DISABLE_ENV}={broken.distribution}."
            )
            error.plugin = broken.name  # type: ignore[attr-defined]
            error.distribution = broken.distribution  # type: ignore[attr-defined]
            error.plugin_traceback = broken.traceback  # type: ignore[attr-defined]
            raise error
        raise UnknownPluginError(concern, name, self.names(concern), self._unknown_hint(concern, name))

    def _unknown_hint(self, concern: str, name: str) -> str | None:
        key = name.strip().lower()
        provider = FIRST_PARTY_PROVIDERS.get((concern, key))
        expected = _provider_distributions(concern, key)
        for skipped in self.skipped:
            if _normalise(skipped.distribution) in expected:
                return f"{skipped.distribution} is installed but was skipped ({skipped.reason})."
        if provider:
            return f"It is provided by {provider}: {_install_hint(provider)}."
        if concern in CONCERN_DISTRIBUTIONS and not self.tables[concern]:
            return f"Install {CONCERN_DISTRIBUTIONS[concern]}: {_install_hint(CONCERN_DISTRIBUTIONS[concern])}."
        if self.broken():
            names = "; ".join(f"{r.label} ({r.error})" for r in self.broken())
            return f"These plugins failed to load and may provide it: {names}."
        return "Run `wan plugins` to see what is installed."

    def get(self, concern: str, name: str) -> Any:
        """The implementation object selected by ``name``, checked to be available here."""
        entry = self.lookup(concern, name)
        availability = entry.availability()
        if not availability.ok:
            reason = availability.reason or "not available on this machine"
            hint = getattr(entry.impl, "install_hint", "")
            if hint and hint not in reason:
                reason = f"{reason} ({hint})"
            raise PluginUnavailableError(concern, entry.name, reason, entry.distribution)
        return entry.impl

    def _broken_provider(self, concern: str, name: str) -> PluginRecord | None:
        """The broken plugin that would have provided ``name``, judged by distribution naming."""
        expected = _provider_distributions(concern, name)
        entry_names = {_normalise(f"{concern}-{name}"), _normalise(name)}
        for record in self.broken():
            if _normalise(record.distribution) in expected or _normalise(record.name) in entry_names:
                return record
        return None

    @staticmethod
    def _check_concern(concern: str) -> None:
        if concern not in CONCERNS:
            raise ValueError(f"unknown concern {concern!r}; concerns: {', '.join(CONCERNS)}")

    # -- description --------------------------------------------------------------------------

    def describe(self, *, tracebacks: bool = False) -> dict[str, Any]:
        """Everything ``wan plugins --json`` prints (tracebacks of broken plugins on request).

        Shape::

            {"entry_point_group": "wan_kernel",
             "switches": {"WAN_LOAD_PLUGINS": [...] | None, "WAN_DISABLE_PLUGINS": [...]},
             "plugins": [{"plugin", "distribution", "version", "module", "broken", "error",
                          ["traceback",] "implementations": {concern: [impl, ...]}}, ...],
             "concerns": {concern: [impl + {"plugin", "distribution", "version"}, ...]},
             "broken": [{"plugin", "distribution", "version", "module", "error"}, ...],
             "skipped": [{"plugin", "distribution", "version", "reason"}, ...],
             "duplicates": [{"concern", "name", "distributions": [first, second], "message"}, ...]}

        where ``impl`` is ``{"name", "aliases", "description", "available", "reason"}``; every
        implementation's ``availability()`` is probed once.
        """
        per_plugin: dict[str, dict[str, list[dict[str, Any]]]] = {}
        concerns: dict[str, list[dict[str, Any]]] = {}
        for concern, table in self.tables.items():
            concerns[concern] = []
            for entry in table.values():
                availability = entry.availability()
                impl = {
                    "name": entry.name,
                    "aliases": list(entry.aliases),
                    "description": str(getattr(entry.impl, "description", "") or ""),
                    "available": availability.ok,
                    "reason": availability.reason,
                }
                per_plugin.setdefault(entry.plugin + "\0" + entry.distribution, {}).setdefault(
                    concern, []
                ).append(impl)
                concerns[concern].append(
                    {**impl, "plugin": entry.plugin, "distribution": entry.distribution, "version": entry.version}
                )
        plugins = []
        for record in self.records:
            item: dict[str, Any] = {
                "plugin": record.name,
                "distribution": record.distribution,
                "version": record.version,
                "module": record.module,
                "broken": record.broken,
                "error": record.error,
            }
            if tracebacks:
                item["traceback"] = record.traceback
            item["implementations"] = per_plugin.get(record.name + "\0" + record.distribution, {})
            plugins.append(item)
        return {
            "entry_point_group": ENTRY_POINT_GROUP,
            "switches": {
                LOAD_ENV: sorted(self._only) if self._only is not None else None,
                DISABLE_ENV: sorted(self._disabled),
            },
            "plugins": plugins,
            "concerns": concerns,
            "broken": [
                {
                    "plugin": r.name,
                    "distribution": r.distribution,
                    "version": r.version,
                    "module": r.module,
                    "error": r.error,
                    **({"traceback": r.traceback} if tracebacks else {}),
                }
                for r in self.broken()
            ],
            "skipped": [
                {"plugin": s.name, "distribution": s.distribution, "version": s.version, "reason": s.reason}
                for s in self.skipped
            ],
            "duplicates": [
                {"concern": d.concern, "name": d.name, "distributions": list(d.distributions), "message": str(d)}
                for d in self.duplicates
            ],
        }


def install_hints(concern: str) -> list[str]:
    """The first-party distributions that provide implementations of ``concern``."""
    found = [dist for (c, _), dist in FIRST_PARTY_PROVIDERS.items() if c == concern]
    if concern in CONCERN_DISTRIBUTIONS:
        found.append(CONCERN_DISTRIBUTIONS[concern])
    return list(dict.fromkeys(found))


_manager: PluginManager | None = None


def get_plugin_manager(*, reload: bool = False) -> PluginManager:
    """The process-wide plugin manager (discovered on first use; ``reload=True`` rediscovers)."""
    global _manager
    if _manager is None or reload:
        _manager = PluginManager()
    return _manager


def resolve(concern: str, name: str, *, manager: PluginManager | None = None) -> Any:
    """Shorthand for ``get_plugin_manager().get(concern, name)``."""
    return (manager or get_plugin_manager()).get(concern, name)


# -- checking what an attention plugin does -------------------------------------------------------

ATTENTION_FALLBACK_HINT = "Use --attn sdpa (PyTorch's built-in attention) to run without it"


def _provider_label(concern: str, name: str, manager: PluginManager | None) -> str:
    try:
        entry = (manager or get_plugin_manager()).lookup(concern, name)
    except Exception:  # noqa: BLE001 - only for the message
        return repr(name)
    return f"{entry.name!r} (from {entry.distribution})" if entry.distribution else repr(entry.name)


def _failure_error(message: str, exc: BaseException | None) -> BrokenPluginError:
    error = BrokenPluginError(message)
    if exc is not None:
        error.plugin_traceback = "".join(  # type: ignore[attr-defined]
            traceback.format_exception(type(exc), exc, exc.__traceback__)
        )
    return error


def check_attention_backend(
    impl: Callable,
    *,
    name: str,
    device: Any,
    dtype: Any,
    head_dim: int = 64,
    heads: int = 2,
    manager: PluginManager | None = None,
) -> None:
    """Call an attention implementation once on a tiny input and check what it returns against
    the interface: a tensor of ``q``'s shape ``[B, Lq, H, D]`` and dtype, finite where the input is.

    Run once at set-up (never in the hot path); the probe uses the model's head size, the run's
    device and dtype, and ``k_lens``.

    :raises BrokenPluginError: the implementation raised, or returned the wrong shape, dtype or
        NaN; the message names the plugin and its distribution and suggests ``--attn sdpa``; the
        plugin's traceback is kept on the error (shown with ``WAN_DEBUG=1`` / ``--verbose``).
    """
    import torch

    label = _provider_label("attention", name, manager)
    generator = torch.Generator("cpu").manual_seed(0)
    q = torch.randn(2, 8, heads, head_dim, generator=generator).to(device=device, dtype=dtype)
    k = torch.randn(2, 6, heads, head_dim, generator=generator).to(device=device, dtype=dtype)
    v = torch.randn(2, 6, heads, head_dim, generator=generator).to(device=device, dtype=dtype)
    k_lens = torch.tensor([6, 3], dtype=torch.int32, device=device)
    try:
        with torch.no_grad():
            out = impl(q, k, v, k_lens=k_lens)
    except Exception as exc:  # noqa: BLE001 - a plugin may raise anything
        raise _failure_error(
            f"attention plugin {label} failed on a small test input (q {list(q.shape)} {dtype}, "
            f"device {device}): {type(exc).__name__}: {exc}. {ATTENTION_FALLBACK_HINT}, or report this "
            "to the plugin's authors.",
            exc,
        ) from exc
    if not isinstance(out, torch.Tensor):
        problem = f"returned {type(out).__name__}, not a tensor"
    elif tuple(out.shape) != tuple(q.shape):
        problem = (
            f"returned shape {list(out.shape)} for q of shape {list(q.shape)} (it must return q's shape)"
        )
    elif out.dtype != q.dtype:
        problem = f"returned dtype {out.dtype} for q in {q.dtype} (it must return q's dtype)"
    elif not bool(torch.isfinite(out).all()):
        problem = "returned NaN or Inf for finite inputs"
    else:
        return
    raise _failure_error(
        f"attention plugin {label} breaks the attention interface: it {problem}. "
        f"{ATTENTION_FALLBACK_HINT}, or report this to the plugin's authors.",
        None,
    )


def plugin_failure(
    exc: BaseException, impl: object, *, concern: str, name: str, manager: PluginManager | None = None
) -> BrokenPluginError | None:
    """A :class:`BrokenPluginError` naming the plugin when ``exc`` was raised inside ``impl``'s
    module (a third-party kernel failing in the middle of a run), else ``None``.

    The error carries the original traceback as ``plugin_traceback`` (shown with ``WAN_DEBUG=1``).
    """
    import sys as _sys

    if isinstance(exc, (KeyboardInterrupt, SystemExit)) or impl is None:
        return None
    module = _sys.modules.get(getattr(type(impl), "__module__", "") or "")
    filename = getattr(module, "__file__", None)
    if not filename:
        return None
    files = {os.path.abspath(filename)}
    if os.path.basename(filename) == "__init__.py":  # a package: any file in it
        folder = os.path.dirname(os.path.abspath(filename)) + os.sep
    else:
        folder = None
    tb = exc.__traceback__
    inside = False
    while tb is not None:
        current = os.path.abspath(tb.tb_frame.f_code.co_filename)
        if current in files or (folder and current.startswith(folder)):
            inside = True
            break
        tb = tb.tb_next
    if not inside:
        return None
    label = _provider_label(concern, name, manager)
    hint = ATTENTION_FALLBACK_HINT if concern == "attention" else f"Choose another {concern} implementation"
    return _failure_error(
        f"{concern} plugin {label} failed during the run: {type(exc).__name__}: {exc}. {hint}, or report "
        "this to the plugin's authors.",
        exc,
    )

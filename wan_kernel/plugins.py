"""Plugin discovery and the per-concern implementation tables.

Plugins are entry points in the group ``wan_kernel``. Each is loaded on its own: one that fails
to import is recorded as broken (with its traceback) and only becomes an error when the user
selects something it would have provided. Every loaded plugin's registry hooks are called once,
with a ``register`` callable that knows which distribution is registering, so duplicate names
are reported with both culprits.

Environment switches (comma-separated entry-point or distribution names):

- ``WAN_LOAD_PLUGINS``: load only these plugins (set it empty to load none).
- ``WAN_DISABLE_PLUGINS``: skip these plugins.
"""

from __future__ import annotations

import importlib.metadata as importlib_metadata
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


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _split_env(value: str | None) -> set[str] | None:
    if value is None:
        return None
    return {_normalise(part) for part in value.split(",") if part.strip()}


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


@attrs.frozen
class Registered:
    """One registered implementation and where it came from."""

    concern: str
    impl: Any
    plugin: str
    distribution: str

    @property
    def name(self) -> str:
        return self.impl.name

    @property
    def aliases(self) -> tuple[str, ...]:
        return tuple(getattr(self.impl, "aliases", ()) or ())

    def availability(self) -> Availability:
        try:
            result = self.impl.availability()
        except Exception as exc:  # an availability probe must never crash discovery
            return Availability.no(f"availability check failed: {type(exc).__name__}: {exc}")
        if isinstance(result, Availability):
            return result
        ok, reason = result if isinstance(result, tuple) else (bool(result), "")
        return Availability(bool(ok), str(reason))


class PluginManager:
    """Discovers plugins and keeps one implementation table per concern."""

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
        self.tables: dict[str, dict[str, Registered]] = {concern: {} for concern in CONCERNS}
        self.aliases: dict[str, dict[str, str]] = {concern: {} for concern in CONCERNS}
        self.duplicates: list[DuplicatePluginNameError] = []
        if load_entry_points:
            self._load_entry_points()
        for name, module in extra_plugins:
            self._register_module(name, module, PluginRecord(name, name, "", getattr(module, "__name__", name)))
        self._collect()

    # -- discovery ----------------------------------------------------------------------------

    def _selected(self, entry_point_name: str, distribution: str) -> bool:
        names = {_normalise(entry_point_name), _normalise(distribution)}
        if self._only is not None and not names & self._only:
            return False
        return not names & self._disabled

    def _load_entry_points(self) -> None:
        seen: set[tuple[str, str]] = set()
        for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist
            dist_name = dist.metadata["Name"] if dist is not None else "unknown"
            version = dist.version if dist is not None else ""
            key = (_normalise(dist_name), ep.name)
            if key in seen:
                continue
            seen.add(key)
            if not self._selected(ep.name, dist_name):
                continue
            record = PluginRecord(ep.name, dist_name, version, ep.value)
            try:
                module = ep.load()
            except BaseException as exc:  # noqa: BLE001 - a broken plugin must not stop discovery
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                record.error = f"{type(exc).__name__}: {exc}"
                record.traceback = traceback.format_exc()
                self.records.append(record)
                continue
            self._register_module(ep.name, module, record)

    def _register_module(self, name: str, module: object, record: PluginRecord) -> None:
        try:
            self._pm.register(module, name=name)
            unknown = [
                impl.function.__name__
                for hook in self._pm.hook.__dict__.values()
                if isinstance(hook, pluggy.HookCaller) and not hook.has_spec()
                for impl in hook.get_hookimpls()
                if impl.plugin is module
            ]
            if unknown:
                self._pm.unregister(module)
                raise ValueError(
                    f"implements unknown hook(s) {', '.join(sorted(unknown))}; known hooks: "
                    + ", ".join(sorted(hookspecs.REGISTRY_HOOKS.values()))
                )
        except Exception as exc:
            record.error = f"{type(exc).__name__}: {exc}"
            record.traceback = traceback.format_exc()
        self.records.append(record)

    def _collect(self) -> None:
        by_plugin = {r.name: r for r in self.records}
        for concern, hook_name in hookspecs.REGISTRY_HOOKS.items():
            caller = getattr(self._pm.hook, hook_name)
            # pluggy returns hookimpls last-registered-first; register in discovery order instead
            for hookimpl in reversed(caller.get_hookimpls()):
                record = by_plugin.get(hookimpl.plugin_name)
                if record is None or record.broken:
                    continue
                register = self._make_register(concern, record)
                try:
                    hookimpl.function(register=register)
                except Exception as exc:
                    record.error = f"{hook_name} failed: {type(exc).__name__}: {exc}"
                    record.traceback = traceback.format_exc()
                    table = self.tables[concern]
                    for key in [k for k, v in table.items() if v.plugin == record.name]:
                        del table[key]

    def _make_register(self, concern: str, record: PluginRecord) -> Callable[[object], None]:
        interface = CONCERNS[concern]

        def register(impl: object) -> None:
            name = getattr(impl, "name", None)
            if not isinstance(name, str) or not name:
                raise TypeError(f"{concern} implementation {impl!r} has no string `name`")
            if not callable(getattr(impl, "availability", None)):
                raise TypeError(
                    f"{concern} implementation {name!r} has no availability() method "
                    f"(subclass wan_kernel.interfaces.{interface.__name__})"
                )
            entry = Registered(concern, impl, record.name, record.distribution)
            for key in (name, *entry.aliases):
                existing = self._owner(concern, key)
                if existing is not None:
                    self.duplicates.append(
                        DuplicatePluginNameError(concern, key, existing.distribution, record.distribution)
                    )
                    continue
                if key == name:
                    self.tables[concern][key] = entry
                else:
                    self.aliases[concern][key] = name
            if name not in self.tables[concern]:
                return
            # make sure an alias registered before under this name does not shadow it
            self.aliases[concern].pop(name, None)

        return register

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
        return [r for r in self.records if r.broken]

    def lookup(self, concern: str, name: str) -> Registered:
        """The registration selected by ``name``, available or not; raises if unknown."""
        self._check_concern(concern)
        for duplicate in self.duplicates:
            if duplicate.concern == concern and duplicate.name == name:
                raise duplicate
        entry = self._owner(concern, name)
        if entry is not None:
            return entry
        provider = FIRST_PARTY_PROVIDERS.get((concern, name))
        broken = self._broken_provider(provider)
        if broken is not None:
            raise BrokenPluginError(
                f"{concern} implementation {name!r} comes from {broken.distribution}, which failed to "
                f"load: {broken.error}\n{broken.traceback or ''}".rstrip()
            )
        hint = None
        if provider:
            folder = provider.removeprefix("wan-").replace("-", "_")
            hint = f"It is provided by {provider}: pip install {provider} (or pip install -e plugins/{folder})."
        elif self.broken():
            names = ", ".join(f"{r.distribution} ({r.error})" for r in self.broken())
            hint = f"These plugins failed to load and may provide it: {names}."
        elif concern in CONCERN_DISTRIBUTIONS and not self.tables[concern]:
            dist = CONCERN_DISTRIBUTIONS[concern]
            hint = f"Install {dist}: pip install {dist}."
        raise UnknownPluginError(concern, name, self.names(concern), hint)

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

    def _broken_provider(self, distribution: str | None) -> PluginRecord | None:
        if distribution is None:
            return None
        for record in self.broken():
            if _normalise(record.distribution) == _normalise(distribution):
                return record
        return None

    @staticmethod
    def _check_concern(concern: str) -> None:
        if concern not in CONCERNS:
            raise ValueError(f"unknown concern {concern!r}; concerns: {', '.join(CONCERNS)}")

    # -- description --------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Everything ``wan plugins --json`` prints."""
        plugins = []
        for record in self.records:
            implementations: dict[str, list[dict[str, Any]]] = {}
            for concern, table in self.tables.items():
                for entry in table.values():
                    if entry.plugin != record.name:
                        continue
                    availability = entry.availability()
                    implementations.setdefault(concern, []).append(
                        {
                            "name": entry.name,
                            "aliases": list(entry.aliases),
                            "description": getattr(entry.impl, "description", ""),
                            "available": availability.ok,
                            "reason": availability.reason,
                        }
                    )
            plugins.append(
                {
                    "plugin": record.name,
                    "distribution": record.distribution,
                    "version": record.version,
                    "module": record.module,
                    "broken": record.broken,
                    "error": record.error,
                    "implementations": implementations,
                }
            )
        return {
            "entry_point_group": ENTRY_POINT_GROUP,
            "plugins": plugins,
            "duplicates": [str(d) for d in self.duplicates],
        }


_manager: PluginManager | None = None


def get_plugin_manager(*, reload: bool = False) -> PluginManager:
    """The process-wide plugin manager (discovered on first use)."""
    global _manager
    if _manager is None or reload:
        _manager = PluginManager()
    return _manager


def resolve(concern: str, name: str, *, manager: PluginManager | None = None) -> Any:
    """Shorthand for ``get_plugin_manager().get(concern, name)``."""
    return (manager or get_plugin_manager()).get(concern, name)

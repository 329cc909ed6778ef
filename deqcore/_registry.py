"""The plugin registry: built-ins and entry-point plugins, loaded lazily and once."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import os
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import pluggy

from . import _hookspecs

KINDS = ("backends", "solvers", "gradients", "hypersolvers")
ENTRY_POINT_GROUP = "deqcore"
DISABLE_ENV = "DEQCORE_DISABLE_PLUGIN_AUTOLOAD"
BLOCK_ENV = "DEQCORE_BLOCK_PLUGINS"
BUILTIN_PLUGINS = (
    ("deqcore", "deqcore._builtin_plugin"),
    ("deqcore_torch", "deqcore_torch"),
    ("deqcore_jax", "deqcore_jax"),
)


class PluginError(RuntimeError):
    """A plugin conflict, such as two plugins registering the same name."""


class PluginWarning(UserWarning):
    """A plugin failed to import or to register; the others keep working."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered thing: its kind, name, object, the plugin that added it, and extra info."""

    kind: str
    name: str
    obj: Any
    plugin: str
    info: dict[str, Any]


class Register:
    """The ``register`` callable handed to a plugin's hook, bound to one kind and one plugin.

    It is valid only while the hook runs: a plugin that keeps it and calls it later gets a
    :class:`PluginError` rather than silently changing (or failing to change) the registry.
    """

    def __init__(self, registry: Registry, kind: str, plugin: str) -> None:
        self._registry, self.kind, self.plugin = registry, kind, plugin
        self._open = True

    def __call__(self, name: str, obj: Any, **info: Any) -> None:
        if not self._open:
            raise PluginError(
                f"plugin {self.plugin!r} called register() for {self.kind} after its "
                f"deqcore_register_{self.kind} hook returned; register from inside the hook"
            )
        if not isinstance(name, str) or not name:
            raise ValueError(f"plugin {self.plugin!r} registered a {self.kind[:-1]} with name {name!r}")
        self._registry._add(Entry(self.kind, name, obj, self.plugin, info))


class Registry:
    """Everything plugins registered. Load happens on first use; :meth:`reset` forgets it all.

    Environment: ``DEQCORE_DISABLE_PLUGIN_AUTOLOAD=1`` skips entry-point plugins (built-ins still
    load); ``DEQCORE_BLOCK_PLUGINS=a,b`` blocks plugins by name, built-in ones included.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.reset()

    def reset(self) -> None:
        """Forget all plugins and instantiated backends; the next use loads them again."""
        with self._lock:
            self._entries: dict[str, dict[str, Entry]] | None = None
            self._plugins: list[str] = []
            self._backend_instances: dict[str, Any] = {}
            self._pending: dict[str, dict[str, Entry]] = {}
            self._loading = False

    def _add(self, entry: Entry) -> None:
        table = self._pending[entry.kind]
        if entry.name in table:
            other = table[entry.name].plugin
            builtin = {name for name, _ in BUILTIN_PLUGINS}
            # suggest blocking the third-party one: blocking "deqcore" would drop every built-in
            culprit = other if entry.plugin in builtin and other not in builtin else entry.plugin
            raise PluginError(
                f"{entry.kind[:-1]} {entry.name!r} is registered twice: by plugin {other!r} and by "
                f"plugin {entry.plugin!r}. Uninstall one, or block it with {BLOCK_ENV}={culprit}"
            )
        table[entry.name] = entry

    def _load(self) -> dict[str, dict[str, Entry]]:
        with self._lock:
            if self._entries is not None:
                return self._entries
            if self._loading:  # the lock is reentrant: only a hook of this very load gets here
                raise PluginError(
                    "the deqcore registry was used while plugins were registering (a plugin hook "
                    "called deqcore.solve/available/registry()); hooks must only call register()"
                )
            self._loading = True
            try:
                return self._load_plugins()
            finally:
                self._loading = False

    def _load_plugins(self) -> dict[str, dict[str, Entry]]:
        pm = pluggy.PluginManager("deqcore")
        pm.add_hookspecs(_hookspecs)
        blocked = {b.strip() for b in os.environ.get(BLOCK_ENV, "").split(",") if b.strip()}
        for name in blocked:
            pm.set_blocked(name)
        for name, module in BUILTIN_PLUGINS:
            if name not in blocked:
                pm.register(importlib.import_module(module), name=name)
        if os.environ.get(DISABLE_ENV, "").strip().lower() in ("", "0", "false", "no", "off"):
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                if ep.name in blocked:
                    continue
                if pm.has_plugin(ep.name):
                    _warn(f"plugin {ep.name!r} ({ep.value}) is ignored: the name {ep.name!r} is already "
                          f"taken by {_describe(pm.get_plugin(ep.name))}")
                    continue
                try:
                    plugin = ep.load()
                    pm.register(plugin, name=ep.name)
                except Exception as exc:  # a broken plugin must not break the others
                    _warn(f"plugin {ep.name!r} ({ep.value}) could not be loaded and is ignored: "
                          f"{type(exc).__name__}: {exc}")
        _warn_unknown_hooks(pm)
        # Call hooks in plugin registration order (built-ins first), so that a duplicate name is
        # reported against the plugin that came second.
        order = {name: i for i, (name, plugin) in enumerate(pm.list_name_plugin()) if plugin is not None}
        self._pending = {kind: {} for kind in KINDS}
        failed: set[str] = set()
        for kind in KINDS:
            hook = getattr(pm.hook, f"deqcore_register_{kind}")
            impls = [i for i in hook.get_hookimpls() if not (i.hookwrapper or i.wrapper)]
            for impl in sorted(impls, key=lambda i: order.get(i.plugin_name, len(order))):
                if impl.plugin_name in failed:
                    continue
                register = Register(self, kind, impl.plugin_name)
                try:
                    impl.function(**{arg: register for arg in impl.argnames})
                except PluginError:
                    raise
                except Exception as exc:  # drop everything this plugin registered, all kinds
                    failed.add(impl.plugin_name)
                    for table in self._pending.values():
                        for name in [n for n, e in table.items() if e.plugin == impl.plugin_name]:
                            del table[name]
                    _warn(f"plugin {impl.plugin_name!r} failed while registering {kind} and is "
                          f"ignored: {type(exc).__name__}: {exc}")
                finally:
                    register._open = False
        self._plugins = [name for name in order if name not in failed]
        self._entries = self._pending
        return self._entries

    def names(self, kind: str) -> list[str]:
        """Sorted names registered for ``kind`` (one of ``KINDS``)."""
        return sorted(self._table(kind))

    def entries(self, kind: str | None = None) -> list[Entry]:
        """All entries, or those of one kind, sorted by kind and name."""
        kinds = KINDS if kind is None else (kind,)
        return [self._table(k)[n] for k in kinds for n in sorted(self._table(k))]

    def plugins(self) -> list[str]:
        """Names of the loaded plugins (built-ins included)."""
        self._load()
        return list(self._plugins)

    def get(self, kind: str, name: str) -> Entry:
        table = self._table(kind)
        if name not in table:
            listing = ", ".join(sorted(table)) or "(none)"
            raise ValueError(f"unknown {kind[:-1]} {name!r}; available {kind}: {listing}")
        return table[name]

    def backend(self, name: str) -> Any:
        """The backend instance named ``name``, created on first use."""
        entry = self.get("backends", name)
        with self._lock:
            if name not in self._backend_instances:
                factory: Callable[[], Any] = entry.obj
                try:
                    self._backend_instances[name] = factory()
                except ImportError as exc:
                    hint = entry.info.get("install", "")
                    raise ImportError(
                        f"deqcore backend {name!r} could not import its framework ({exc})."
                        + (f" Install it with: {hint}" if hint else "")
                    ) from exc
            return self._backend_instances[name]

    def backend_for(self, obj: Any) -> str | None:
        """The name of the backend whose arrays include ``obj``'s type, judged by module name.

        The type's bases count too, so a user's subclass of ``torch.Tensor`` (defined in the
        user's own module) still belongs to torch. Nothing is imported.
        """
        backends = self.entries("backends")
        for cls in type(obj).__mro__:
            root = getattr(cls, "__module__", "").split(".")[0]
            for entry in backends:
                if root in entry.info.get("modules", ()):
                    return entry.name
        return None

    def _table(self, kind: str) -> dict[str, Entry]:
        if kind not in KINDS:
            raise ValueError(f"unknown registry kind {kind!r}; kinds: {', '.join(KINDS)}")
        return self._load()[kind]


def _warn(message: str) -> None:
    """Warn with :class:`PluginWarning`, attributed to the first caller outside deqcore."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(0), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"deqcore: {message}", PluginWarning, stacklevel=level)


def _describe(plugin: Any) -> str:
    return f"module {plugin.__name__!r}" if hasattr(plugin, "__name__") else repr(plugin)


def _warn_unknown_hooks(pm: pluggy.PluginManager) -> None:
    """Warn about ``deqcore_*`` hook implementations that match no hook (a misspelt hook name
    would otherwise register nothing, silently)."""
    for name, caller in vars(pm.hook).items():
        if not isinstance(caller, pluggy.HookCaller) or caller.spec is not None:
            continue
        for impl in caller.get_hookimpls():
            if not impl.optionalhook:
                known = ", ".join(sorted(n for n in vars(_hookspecs) if n.startswith("deqcore_")))
                _warn(f"plugin {impl.plugin_name!r} implements {name!r}, which is not a deqcore hook "
                      f"(hooks: {known}); it is never called")


REGISTRY = Registry()


def registry() -> Registry:
    """The process-wide plugin registry."""
    return REGISTRY


def available() -> dict[str, list[str]]:
    """What is registered, by kind: ``{"backends": [...], "solvers": [...], ...}``."""
    return {kind: REGISTRY.names(kind) for kind in KINDS}

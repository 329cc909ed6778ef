"""The plugin registry: built-ins and entry-point plugins, loaded lazily and once."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import inspect
import os
import sys
import threading
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import pluggy

from . import _hookspecs
from ._capabilities import Capabilities
from ._inputs import SOLVE_PARAMETERS
from ._options import Option
from ._protocol import Backend

KINDS = ("backends", "solvers", "gradients", "hypersolvers")
ENTRY_POINT_GROUP = "deqcore"
DISABLE_ENV = "DEQCORE_DISABLE_PLUGIN_AUTOLOAD"
BLOCK_ENV = "DEQCORE_BLOCK_PLUGINS"
BUILTIN_PLUGINS = (
    ("deqcore", "deqcore._builtin_plugin"),
    ("deqcore_torch", "deqcore_torch"),
    ("deqcore_jax", "deqcore_jax"),
)
#: Accepted values of ``DEQCORE_DISABLE_PLUGIN_AUTOLOAD`` (lower-cased, stripped); anything else
#: is a ``ValueError``, since whether it means "on" or "off" cannot be told.
DISABLE_VALUES = {"": False, "0": False, "false": False, "no": False, "off": False,
                  "1": True, "true": True, "yes": True, "on": True}
#: What ``register(...)`` accepts as keywords for a backend (the registry reads them; a misspelt
#: one would silently change behaviour). Other kinds keep their keywords in ``Entry.info`` unread.
BACKEND_INFO = ("modules", "install")


class PluginError(RuntimeError):
    """A plugin fault deqcore cannot work around: two plugins registering the same name, a hook
    misusing ``register`` or the registry, or a backend whose factory fails or builds an object
    that does not implement :class:`deqcore.extend.Backend` (raised when that backend is first used)."""


class PluginWarning(UserWarning):
    """A plugin failed to import or to register, or registered something that breaks its
    contract, and is ignored (the others keep working); or a plugin setting names no plugin."""


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
        entry = Entry(self.kind, name, obj, self.plugin, info)
        _check_entry(entry)
        self._registry._add(entry)


class Registry:
    """Everything plugins registered. Load happens on first use; :meth:`reset` forgets it all.

    Environment: ``DEQCORE_DISABLE_PLUGIN_AUTOLOAD=1`` skips entry-point plugins (built-ins still
    load; ``1``/``true``/``yes``/``on`` and ``0``/``false``/``no``/``off``/empty are accepted, any
    other value is a ``ValueError``); ``DEQCORE_BLOCK_PLUGINS=a,b`` blocks plugins by name,
    built-in ones included (a name that matches no plugin gives a :class:`PluginWarning`).

    Everything registered is checked against its contract when it is registered (a solver class
    against :class:`deqcore.extend.Solver`, ...); a plugin that breaks one is dropped with a
    :class:`PluginWarning`. A backend is checked against :class:`deqcore.extend.Backend` when its factory
    first runs (:meth:`backend`), since building it imports its framework.
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
        disabled = _autoload_disabled()
        entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        blocked = {b.strip() for b in os.environ.get(BLOCK_ENV, "").split(",") if b.strip()}
        _warn_unknown_blocked(blocked, [n for n, _ in BUILTIN_PLUGINS] + [ep.name for ep in entry_points])
        for name in blocked:
            pm.set_blocked(name)
        for name, module in BUILTIN_PLUGINS:
            if name not in blocked:
                pm.register(importlib.import_module(module), name=name)
        if not disabled:
            for ep in entry_points:
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
        """The backend instance named ``name``, created on first use.

        Raises ``ImportError`` (with the plugin's install hint) when the factory cannot import its
        framework, and :class:`PluginError` when the factory raises anything else or builds an
        object that is not a :class:`deqcore.extend.Backend` (missing or non-callable members, members
        whose signature differs from the protocol's, a ``name`` other than ``name``). A failed
        build is not cached: the next call tries again.
        """
        entry = self.get("backends", name)
        with self._lock:
            if name not in self._backend_instances:
                factory: Callable[[], Any] = entry.obj
                try:
                    backend = factory()
                except ImportError as exc:
                    hint = entry.info.get("install", "")
                    raise ImportError(
                        f"deqcore backend {name!r} could not import its framework ({exc})."
                        + (f" Install it with: {hint}" if hint else "")
                    ) from exc
                except Exception as exc:
                    raise PluginError(
                        f"backend {name!r} of plugin {entry.plugin!r} could not be built: its factory "
                        f"{_qualname(factory)}() raised {type(exc).__name__}: {exc}. {_fix(entry.plugin)}"
                    ) from exc
                _check_backend(entry, backend)
                self._backend_instances[name] = backend
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


def _autoload_disabled() -> bool:
    raw = os.environ.get(DISABLE_ENV, "")
    value = raw.strip().lower()
    if value not in DISABLE_VALUES:
        on = ", ".join(repr(v) for v, off in DISABLE_VALUES.items() if off)
        keep = ", ".join(repr(v) for v, off in DISABLE_VALUES.items() if not off)
        raise ValueError(f"{DISABLE_ENV}={raw!r} is not a recognised value: set it to one of {on} to "
                         f"skip entry-point plugins, or to one of {keep} (or unset it) to load them")
    return DISABLE_VALUES[value]


def _warn_unknown_blocked(blocked: set[str], known: list[str]) -> None:
    """Warn about ``DEQCORE_BLOCK_PLUGINS`` entries that name no plugin: a misspelt name would
    otherwise leave the plugin it meant loaded, silently."""
    for name in sorted(blocked - set(known)):
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        listing = ", ".join(sorted(set(known)))
        _warn(f"{BLOCK_ENV} names {name!r}, which matches no installed plugin ({listing}), so it blocks "
              f"nothing{hint}")


def _fix(plugin: str) -> str:
    return f"Fix or update the plugin, or block it with {BLOCK_ENV}={plugin}"


def _qualname(obj: Any) -> str:
    module = getattr(obj, "__module__", None)
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}.{name}" if module and module != "builtins" else name


# ------------------------------------------------------------------------------------------------
# contracts: what is registered is checked at registration, a backend when it is first built


def _protocol_members(protocol: type) -> tuple[dict[str, str], list[str]]:
    """A Protocol's data members (name -> annotation) and methods, from the class itself, so the
    check follows the protocol when a member is added."""
    attributes = dict(getattr(protocol, "__annotations__", {}))
    methods = [n for n, v in vars(protocol).items() if not n.startswith("_") and inspect.isfunction(v)]
    return attributes, methods


_ANNOTATED_TYPES: dict[str, type] = {"str": str, "bool": bool, "int": int, "float": float,
                                     "Capabilities": Capabilities}


def _call_problem(name: str, impl: Any, spec: Any, *, bound: bool) -> str | None:
    """What stops ``impl`` from being called the ways ``spec`` (a function whose first parameter
    is ``self``) declares, or None. Parameters without a default are passed positionally; those
    with one both positionally and by keyword; keyword-only ones by keyword; ``*args`` with two
    extra arguments. ``bound`` says ``impl`` takes no ``self``. Unknowable signatures pass."""
    try:
        spec_sig = inspect.signature(spec)
        impl_sig = inspect.signature(impl)
    except (TypeError, ValueError):
        return None
    params = list(spec_sig.parameters.values())[1:]
    kinds = inspect.Parameter
    positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    keywords = {p.name: None for p in params if p.kind is kinds.KEYWORD_ONLY}
    extra = [None, None] if any(p.kind is kinds.VAR_POSITIONAL for p in params) else []
    self_arg = [] if bound else [None]
    required = [p for p in positional if p.default is p.empty]
    by_keyword = {p.name: None for p in positional if p.default is not p.empty}
    calls = [(self_arg + [None] * len(positional) + extra, keywords),
             (self_arg + [None] * len(required), {**by_keyword, **keywords})]
    for args, kwargs in calls:
        try:
            impl_sig.bind(*args, **kwargs)
        except TypeError as exc:
            impl_params = list(impl_sig.parameters.values())[0 if bound else 1:]
            return f"{name}{_plain(impl_params)} cannot be called as {name}{_plain(params)} ({exc})"
    return None


def _plain(params: list[inspect.Parameter]) -> str:
    """A parameter list without annotations, as the docs write it: ``(cond, body, state, max_steps=None)``."""
    empty = inspect.Parameter.empty
    return str(inspect.Signature([p.replace(annotation=empty) for p in params]))


def _check_backend(entry: Entry, backend: Any) -> None:
    """Raise :class:`PluginError` unless ``backend`` implements :class:`deqcore.extend.Backend`."""
    where = f"backend {entry.name!r} of plugin {entry.plugin!r}"
    made = f"its factory {_qualname(entry.obj)}()"
    if backend is None:
        raise PluginError(f"{where} could not be built: {made} returned None instead of a "
                          f"deqcore.extend.Backend. {_fix(entry.plugin)}")
    attributes, methods = _protocol_members(Backend)
    members: dict[str, Any] = {}
    broken = []
    for member in [*attributes, *methods]:
        try:
            members[member] = getattr(backend, member)
        except AttributeError:
            pass
        except Exception as exc:  # a property that fails is as unusable as a missing member
            broken.append(f"reading {member} raised {type(exc).__name__}: {exc}")
            members[member] = None
    missing = [m for m in [*attributes, *methods] if m not in members]
    problems = [f"missing {', '.join(missing)}"] if missing else []
    problems += broken
    for attr, annotation in attributes.items():
        if attr not in members or any(p.startswith(f"reading {attr} ") for p in broken):
            continue
        value = members[attr]
        expected = annotation if isinstance(annotation, type) else _ANNOTATED_TYPES.get(str(annotation))
        if expected is not None and not isinstance(value, expected):
            problems.append(f"{attr} is {value!r}, not a {expected.__name__}")
        elif value is None:
            problems.append(f"{attr} is None")
    name = members.get("name")
    if isinstance(name, str) and name != entry.name:
        problems.append(f"its name is {name!r} but it is registered as {entry.name!r}")
    for method in methods:
        if method not in members or any(p.startswith(f"reading {method} ") for p in broken):
            continue
        impl = members[method]
        if not callable(impl):
            problems.append(f"{method} is not callable (it is {type(impl).__name__})")
        else:
            problem = _call_problem(method, impl, getattr(Backend, method), bound=True)
            if problem is not None:
                problems.append(problem)
    if problems:
        raise PluginError(f"{where} is not a deqcore.extend.Backend ({made} returned a "
                          f"{_qualname(type(backend))}): {'; '.join(problems)}. {_fix(entry.plugin)}")


def _contracts() -> dict[str, tuple[type, list[tuple[type, str]], bool]]:
    """Per kind: the base class, the (owner, method) pairs a subclass must override, and whether
    the class's ``name`` must equal the registered name (it is shown in reports, saved with
    weights). Imported late: the registry loads the built-in gradient modes, whose package holds
    the gradient-mode base."""
    from .gradients._base import AdjointMode, GradientMode
    from .solvers._base import Hypersolver, Solver

    return {
        "solvers": (Solver, [(Solver, "init"), (Solver, "step"), (Solver, "commit")], False),
        "gradients": (GradientMode, [(GradientMode, "attach"), (AdjointMode, "adjoint")], True),
        "hypersolvers": (Hypersolver, [(Hypersolver, "bind"), (Hypersolver, "initial_state")], True),
    }


def _check_entry(entry: Entry) -> None:
    """Raise ``TypeError`` naming the plugin and every problem unless ``entry.obj`` follows its
    kind's contract. Called inside the plugin's hook, so the plugin is then dropped with a
    :class:`PluginWarning`. Imports no framework."""
    what = f"plugin {entry.plugin!r} registered {entry.kind[:-1]} {entry.name!r}"
    if entry.kind == "backends":
        problems = _backend_registration_problems(entry)
        if problems:
            raise TypeError(f"{what}: {'; '.join(problems)}")
        return
    if entry.kind == "gradients" and entry.name == "auto":
        raise TypeError(f"{what}: 'auto' is deqcore.solve's default (implicit where the backend has "
                        "autodiff), not a registrable name; register the mode under another name")
    base, required, named = _contracts()[entry.kind]
    cls = entry.obj
    contract = f"deqcore.extend.{base.__name__}"
    if not (isinstance(cls, type) and issubclass(cls, base)):
        shown = f"class {_qualname(cls)}" if isinstance(cls, type) else f"a {type(cls).__name__} ({cls!r})"
        raise TypeError(f"{what} as {shown}, which is not a subclass of {contract}; register the class")
    problems = []
    missing = [m for owner, m in required if issubclass(cls, owner) and getattr(cls, m) is getattr(owner, m)]
    if missing:
        problems.append(f"it does not implement {', '.join(missing)}")
    for owner in [base, *dict.fromkeys(o for o, _ in required if o is not base and issubclass(cls, o))]:
        for method, spec in vars(owner).items():
            impl = getattr(cls, method)
            if method.startswith("_") or not inspect.isfunction(spec) or method in missing or impl is spec:
                continue
            if not callable(impl):
                problems.append(f"{method} is not callable")
                continue
            bound = isinstance(inspect.getattr_static(cls, method), (staticmethod, classmethod))
            problem = _call_problem(method, impl, spec, bound=bound)
            if problem is not None:
                problems.append(problem)
    for flag in ("unrolled", "exact_higher_order"):
        value = getattr(cls, flag, False)
        if not isinstance(value, bool):
            problems.append(f"its class attribute {flag} is {value!r}, not True or False")
    adjoint_base: Any = next((o for o, m in required if m == "adjoint"), None)
    exact = getattr(cls, "exact_higher_order", False) is True
    if (exact and adjoint_base is not None and issubclass(cls, adjoint_base)
            and inspect.getattr_static(cls, "linear_solver") is vars(adjoint_base)["linear_solver"]):
        problems.append("it declares exact_higher_order but does not implement linear_solver, which "
                        "the backend needs for the linear systems of higher derivatives")
    name = getattr(cls, "name", None)
    if named and name != entry.name:
        problems.append("it has no class attribute name" if name is None else f"its class attribute name "
                        f"is {name!r}; it must be the registered name {entry.name!r}")
    if entry.kind != "hypersolvers":
        problems.extend(_options_problems(cls, solver=entry.kind == "solvers"))
    if problems:
        raise TypeError(f"{what} as class {_qualname(cls)}, which breaks the {contract} contract: "
                        f"{'; '.join(problems)}")


def _options_problems(cls: type, *, solver: bool) -> list[str]:
    options = getattr(cls, "options", None)
    if not isinstance(options, Mapping):
        if options is None:
            return ["it has no class attribute options (a dict of option name -> deqcore.extend.Option; {} "
                    "for none)"]
        return [f"its options are a {type(options).__name__}, not a dict of option name -> "
                "deqcore.extend.Option"]
    problems = []
    reserved: set[str] = set()
    if solver:
        reserved = set(SOLVE_PARAMETERS)
    for key, option in options.items():
        if not isinstance(key, str) or not key.isidentifier():
            problems.append(f"option name {key!r} is not a Python identifier")
        elif key in reserved:
            problems.append(f"option {key!r} is a parameter of deqcore.solve itself, so it could never "
                            f"reach the solver; rename it")
        if not isinstance(option, Option):
            problems.append(f"option {key!r} is {option!r} (type {type(option).__name__}), not a "
                            f"deqcore.extend.Option(default, doc, check)")
            continue
        if not callable(option.check):
            problems.append(f"option {key!r} has a check that is not callable")
            continue
        try:
            verdict = option.check(option.default)
        except Exception as exc:
            problems.append(f"option {key!r}: its check raised {type(exc).__name__}: {exc} on the "
                            f"default {option.default!r}")
            continue
        if verdict is not None:
            problems.append(f"option {key!r} has default {option.default!r}, which its own check rejects "
                            f"(must be {verdict})")
    return problems


def _backend_registration_problems(entry: Entry) -> list[str]:
    problems = []
    if not callable(entry.obj):
        problems.append(f"its factory {entry.obj!r} is not callable (register a function that returns the "
                        "backend; it is called on first use)")
    unknown = sorted(set(entry.info) - set(BACKEND_INFO))
    if unknown:
        problems.append(f"unknown keyword{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                        f"(a backend takes {', '.join(BACKEND_INFO)})")
    modules = entry.info.get("modules", ())
    if (isinstance(modules, str) or not isinstance(modules, (tuple, list, frozenset, set))
            or not all(isinstance(m, str) and m and "." not in m for m in modules)):
        problems.append(f"modules={modules!r}: expected a tuple of top-level module names, such as "
                        "modules=('torch',)")
    if not isinstance(entry.info.get("install", ""), str):
        problems.append(f"install={entry.info['install']!r}: expected the install command as a str")
    return problems


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

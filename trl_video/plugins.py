"""Plugin manager factory and the typed registry façade over the registration hooks."""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from . import PROJECT_NAME, hookspecs
from .errors import PluginError

#: hook point -> registration hook name
KINDS: dict[str, str] = {
    "sampler": "trl_video_register_samplers",
    "estimator": "trl_video_register_estimators",
    "loss": "trl_video_register_losses",
    "reward": "trl_video_register_rewards",
    "replay": "trl_video_register_replay_buffers",
    "method": "trl_video_register_methods",
    "bench": "trl_video_register_benchmarks",
}
#: the five hook points of one training step, in data-flow order (plus "method" bundles and "bench" commands)
HOOK_POINTS = ("sampler", "reward", "estimator", "replay", "loss")

#: the table a plugin declares in its pyproject.toml: which components it provides, for "pip install" hints
#: about plugins that are not installed (``[tool.trl-video] provides = {method = ["velr"], reward = ["lrm"]}``)
PROVIDES_TABLE = "trl-video"

DISABLE_ENV = "TRL_VIDEO_DISABLED_PLUGINS"


@dataclass
class ComponentInfo:
    kind: str
    name: str
    obj: Any
    distribution: str
    version: str
    plugin: str


@dataclass
class MethodSpec:
    """A method = a named bundle of default components, its config dataclass and a citation.

    ``defaults`` maps hook point ("sampler", "estimator", "loss", "replay", "reward") to a
    registered component name; a recipe may override any of them.
    """

    name: str
    config_cls: type
    defaults: dict[str, str]
    description: str = ""
    paper: str = ""
    citation: str = ""
    default_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ``prepare_policy(policy, method_config)``: adapts the loaded model before LoRA / the reference copy are
    #: set up (e.g. Reward-Forcing swaps a bidirectional transformer for its block-causal version); idempotent.
    prepare_policy: Callable[[Any, Any], None] | None = None


def _dist_of(plugin_name: str, plugin: object, dists: dict[str, tuple[str, str]]) -> tuple[str, str]:
    if plugin_name in dists:
        return dists[plugin_name]
    name = getattr(plugin, "__name__", "") or type(plugin).__name__
    if name.startswith("trl_video"):
        from . import __version__

        return "trl-video", __version__
    return name.split(".")[0], "unknown"


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def _disabled() -> set[str]:
    return {p.strip() for p in os.environ.get(DISABLE_ENV, "").split(",") if p.strip()}


def source_checkout() -> Path | None:
    """The repository this core runs from (an editable / source-tree install), or None (a wheel install)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "plugins").is_dir() else None


@dataclass
class PluginEntry:
    """A plugin of the repository's ``plugins/`` folder, installed or not, from its pyproject.toml."""

    distribution: str
    folder: Path
    provides: dict[str, list[str]]


def plugin_catalogue(root: Path | None = None) -> list[PluginEntry]:
    """What each plugin of the checkout declares under ``[tool.trl-video] provides``; empty outside a checkout."""
    import tomllib

    root = root or source_checkout()
    if root is None:
        return []
    out = []
    for pyproject in sorted((root / "plugins").glob("*/pyproject.toml")):
        try:
            data = tomllib.loads(pyproject.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            continue
        provides = data.get("tool", {}).get(PROVIDES_TABLE, {}).get("provides", {})
        name = data.get("project", {}).get("name")
        if name and isinstance(provides, dict):
            out.append(PluginEntry(name, pyproject.parent, {k: list(v) for k, v in provides.items()}))
    return out


def _install_hint(kind: str, name: str) -> str:
    for entry in plugin_catalogue():
        if name in entry.provides.get(kind, []):
            folder = entry.folder.relative_to(entry.folder.parents[1])
            return (f": it is provided by {entry.distribution} (pip install {entry.distribution}; from this "
                    f"checkout: pip install -e {folder})")
    return ""


def make_plugin_manager(load_entrypoints: bool = True, extra_plugins: Iterable[object] = ()) -> tuple[
    pluggy.PluginManager, dict[str, str]
]:
    """Build the plugin manager.

    Returns ``(pm, broken)`` where ``broken`` maps a plugin/entry-point name to a one-line reason;
    a broken plugin never stops the others from loading.
    """
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    broken: dict[str, str] = {}
    dists: dict[str, tuple[str, str]] = {}
    pm.trl_video_dists = dists  # type: ignore[attr-defined]  # plugin name -> (distribution, version)
    disabled = _disabled()
    known: set[str] = {"builtin"}  # every plugin / distribution name seen, disabled or not
    pm.trl_video_known = known  # type: ignore[attr-defined]
    for name in disabled:
        pm.set_blocked(name)
    if load_entrypoints:
        for ep in md.entry_points(group=PROJECT_NAME):
            known.add(ep.name)
            if ep.dist is not None:
                known.add(ep.dist.name)
            if ep.name in disabled or (ep.dist and ep.dist.name in disabled):
                continue
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
                if ep.dist is not None:
                    dists[ep.name] = (ep.dist.name, ep.dist.version)
            except Exception as exc:  # one broken plugin must not kill the rest
                dist = ep.dist.name if ep.dist else ep.value
                broken[ep.name] = f"plugin '{ep.name}' ({dist}) failed to load: {type(exc).__name__}: {_line(exc)}"
    else:
        from . import builtin

        pm.register(builtin, name="builtin")
    for plugin in extra_plugins:
        name = getattr(plugin, "__name__", None) or repr(plugin)
        known.add(name)
        if name in disabled:
            continue
        try:
            pm.register(plugin, name=name)
        except Exception as exc:
            broken[name] = f"plugin '{name}' failed to register: {type(exc).__name__}: {_line(exc)}"
    # what check_pending() checks, but every offending plugin is reported under its own name
    for hook_name, caller in vars(pm.hook).items():
        if getattr(caller, "spec", None) is None and hasattr(caller, "get_hookimpls"):
            for impl in caller.get_hookimpls():
                if not impl.optionalhook:
                    broken[impl.plugin_name] = (f"plugin '{impl.plugin_name}' implements unknown hook '{hook_name}' "
                                                f"(misspelled?)")
    return pm, broken


class Registry:
    """Typed façade: ``registry.get("reward", "luminance")``, ``registry.names("sampler")``.

    A name registered twice for one hook point is a conflict: both plugins are reported in ``broken`` and the
    name is unusable until one of them is uninstalled or disabled; everything else keeps working.
    Benchmarks of a plugin are namespaced ``<plugin>.<name>`` (the bare name stays an alias while it is
    unambiguous); benchmarks in the checkout's ``benchmarks/<method>/`` folders register as ``<method>.<name>``.
    """

    def __init__(self, pm: pluggy.PluginManager, broken: dict[str, str] | None = None,
                 benchmark_dirs: bool = False):
        self.pm = pm
        self.broken: dict[str, str] = dict(broken or {})
        self._items: dict[str, dict[str, ComponentInfo]] = {k: {} for k in KINDS}
        self._conflicts: dict[tuple[str, str], str] = {}
        self._aliases: dict[str, str] = {}  # bare bench name -> namespaced name
        dists = getattr(pm, "trl_video_dists", {})
        for kind, hook_name in KINDS.items():
            hook = getattr(pm.hook, hook_name)
            # call each implementation separately so one failing plugin is reported by name
            for impl in reversed(hook.get_hookimpls()):
                dist, version = _dist_of(impl.plugin_name, impl.plugin, dists)

                def register(name: str, obj: Any, _kind: str = kind, _dist: str = dist, _ver: str = version,
                             _pl: str = impl.plugin_name) -> None:
                    self._add(ComponentInfo(_kind, name, obj, _dist, _ver, _pl))

                try:
                    impl.function(register=register)
                except Exception as exc:
                    self.broken[impl.plugin_name] = (
                        f"plugin '{impl.plugin_name}' ({dist}) failed in {hook_name}: {type(exc).__name__}: {_line(exc)}"
                    )
        if benchmark_dirs:
            from .bench_discovery import discover_benchmarks

            for bench in discover_benchmarks(self.broken):
                self._add(ComponentInfo("bench", bench.name, bench.fn, f"benchmarks/{bench.method}", "",
                                        bench.method))
                for alias in bench.aliases:
                    self._aliases.setdefault(alias, f"{bench.method}.{bench.name}")
        self._report_unknown_disabled()

    def _report_unknown_disabled(self) -> None:
        known = {n for n, p in self.pm.list_name_plugin() if p is not None}
        known |= getattr(self.pm, "trl_video_known", set()) | {"builtin"}
        for name in sorted(_disabled() - known):
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; plugin names: {', '.join(sorted(known))}"
            self.broken[f"{DISABLE_ENV}:{name}"] = (f"{DISABLE_ENV} names '{name}', which is no installed plugin "
                                                    f"or distribution{hint}")

    def _add(self, info: ComponentInfo) -> None:
        name = info.name
        if info.kind == "bench" and info.plugin != "builtin" and "." not in name:
            short = name[len(info.plugin) + 1:] if name.startswith(f"{info.plugin}-") else name
            alias, name = name, f"{info.plugin}.{short}"
            info = ComponentInfo(info.kind, name, info.obj, info.distribution, info.version, info.plugin)
            if alias in self._items["bench"] or alias in self._aliases:
                self._aliases[alias] = ""  # ambiguous: only the namespaced names work
            else:
                self._aliases[alias] = name
        key = (info.kind, name)
        if key in self._conflicts:
            self._conflicts[key] += f", {info.distribution} (plugin '{info.plugin}')"
            self.broken[info.plugin] = f"plugin '{info.plugin}' ({info.distribution}): {self._conflicts[key]}"
            return
        existing = self._items[info.kind].get(name)
        if existing is None:
            self._items[info.kind][name] = info
            return
        if existing.obj is info.obj and existing.plugin == info.plugin:
            return
        del self._items[info.kind][name]
        msg = (f"duplicate {info.kind} '{name}': registered by both {existing.distribution} "
               f"(plugin '{existing.plugin}') and {info.distribution} (plugin '{info.plugin}')")
        self._conflicts[key] = msg
        fix = f"; '{name}' is unusable until one is uninstalled or listed in {DISABLE_ENV}"
        for plugin, dist in ((existing.plugin, existing.distribution), (info.plugin, info.distribution)):
            prev = self.broken.get(plugin)
            line = f"plugin '{plugin}' ({dist}): {msg}{fix}"
            self.broken[plugin] = f"{prev}; {line}" if prev else line

    def names(self, kind: str) -> list[str]:
        return sorted(self._items[kind])

    def items(self, kind: str) -> list[ComponentInfo]:
        return [self._items[kind][n] for n in self.names(kind)]

    def get(self, kind: str, name: str) -> ComponentInfo:
        if kind not in KINDS:
            raise PluginError(f"unknown hook point '{kind}'; expected one of {sorted(KINDS)}")
        if "://" in name:  # a URL: the component registered for its scheme ("http://") serves it
            scheme = name.split("://", 1)[0] + "://"
            info = self._items[kind].get(scheme)
            if info is None:
                hint = " (pip install vidrl-plugin-rewards[serve])" if kind == "reward" else ""
                raise PluginError(f"no {kind} handles '{scheme}' URLs such as '{name}'{hint}")
            return info
        if ":" in name:  # dotted path for one-off code: "mypkg.rewards:score"
            return ComponentInfo(kind, name, resolve_dotted(name), "<dotted path>", "", name)
        info = self._items[kind].get(name)
        if info is None and kind == "bench" and self._aliases.get(name):
            info = self._items[kind].get(self._aliases[name])
        if info is not None:
            return info
        if (kind, name) in self._conflicts:
            raise PluginError(f"{self._conflicts[(kind, name)]}: uninstall one of them or list one in {DISABLE_ENV}")
        msg = f"unknown {kind} '{name}'"
        hint = _install_hint(kind, name)
        if hint:
            msg += hint
        elif kind == "bench" and "." in name:
            from .bench_discovery import REPOSITORY_HINT, benchmarks_root

            msg += f" ({REPOSITORY_HINT})" if benchmarks_root() is None else f"; available: {', '.join(self.names(kind))}"
        else:
            close = difflib.get_close_matches(name, self.names(kind), n=1)
            msg += f"; did you mean '{close[0]}'?" if close else f"; available: {', '.join(self.names(kind)) or 'none'}"
        if self.broken:
            msg += " [broken plugins: " + "; ".join(self.broken.values()) + "]"
        raise PluginError(msg)

    def create(self, kind: str, name: str, **kwargs: Any) -> Any:
        info = self.get(kind, name)
        obj = info.obj
        if "://" in name:
            kwargs = {"url": name, **kwargs}
        elif kind == "reward" and ":" in name and not isinstance(obj, type):
            from .components.rewards import CallableReward

            return CallableReward(obj, name=name, **kwargs)
        try:
            component = obj(**kwargs)
        except TypeError as exc:
            raise PluginError(f"{kind} '{name}' does not accept arguments {sorted(kwargs)}: {exc}") from exc
        from .components.base import ensure_interface

        return ensure_interface(kind, component, name)

    def method(self, name: str) -> MethodSpec:
        return self.get("method", name).obj


def resolve_dotted(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"cannot import '{module_name}' for '{path}': {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"'{module_name}' has no attribute '{attr}' (from '{path}')")
        obj = getattr(obj, part)
    return obj


_DEFAULT: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry built from installed entry points (cached)."""
    global _DEFAULT
    if _DEFAULT is None or refresh:
        pm, broken = make_plugin_manager(load_entrypoints=True)
        if pm.get_plugin("builtin") is None and "builtin" not in _disabled():
            # running from a source tree without an install: still register the built-ins
            from . import builtin

            pm.register(builtin, name="builtin")
        _DEFAULT = Registry(pm, broken, benchmark_dirs=True)
    return _DEFAULT

"""Plugin manager factory and the typed registry façade over the registration hooks."""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
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
#: the five hook points of one training step (plus "method" bundles and "bench" commands)
HOOK_POINTS = ("sampler", "estimator", "loss", "reward", "replay")

#: Which distribution provides a well-known method, for "pip install ..." hints.
KNOWN_PLUGIN_PACKAGES: dict[str, str] = {
    "fcrm": "vidrl-plugin-fcrm",
    "dmalign": "vidrl-plugin-dmalign",
    "rsm": "vidrl-plugin-rsm",
    "flow-grpo": "vidrl-plugin-rsm",
    "tempflow-grpo": "vidrl-plugin-rsm",
    "dance-grpo": "vidrl-plugin-rsm",
    "reward-forcing": "vidrl-plugin-reward-forcing",
    "velr": "vidrl-plugin-velr",
    "lrm": "vidrl-plugin-velr",
}

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
    for name in disabled:
        pm.set_blocked(name)
    if load_entrypoints:
        for ep in md.entry_points(group=PROJECT_NAME):
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
    """Typed façade: ``registry.get("reward", "luminance")``, ``registry.names("sampler")``."""

    def __init__(self, pm: pluggy.PluginManager, broken: dict[str, str] | None = None):
        self.pm = pm
        self.broken: dict[str, str] = dict(broken or {})
        self._items: dict[str, dict[str, ComponentInfo]] = {k: {} for k in KINDS}
        dists = getattr(pm, "trl_video_dists", {})
        for kind, hook_name in KINDS.items():
            hook = getattr(pm.hook, hook_name)
            # call each implementation separately so one failing plugin is reported by name
            for impl in reversed(hook.get_hookimpls()):
                dist, version = _dist_of(impl.plugin_name, impl.plugin, dists)

                def register(name: str, obj: Any, _kind=kind, _dist=dist, _ver=version, _pl=impl.plugin_name):
                    self._add(ComponentInfo(_kind, name, obj, _dist, _ver, _pl))

                try:
                    impl.function(register=register)
                except PluginError:
                    raise
                except Exception as exc:
                    self.broken[impl.plugin_name] = (
                        f"plugin '{impl.plugin_name}' ({dist}) failed in {hook_name}: {type(exc).__name__}: {_line(exc)}"
                    )

    def _add(self, info: ComponentInfo) -> None:
        existing = self._items[info.kind].get(info.name)
        if existing is not None:
            raise PluginError(
                f"duplicate {info.kind} '{info.name}': registered by both {existing.distribution} "
                f"(plugin '{existing.plugin}') and {info.distribution} (plugin '{info.plugin}')"
            )
        self._items[info.kind][info.name] = info

    def names(self, kind: str) -> list[str]:
        return sorted(self._items[kind])

    def items(self, kind: str) -> list[ComponentInfo]:
        return [self._items[kind][n] for n in self.names(kind)]

    def get(self, kind: str, name: str) -> ComponentInfo:
        if kind not in KINDS:
            raise PluginError(f"unknown hook point '{kind}'; expected one of {sorted(KINDS)}")
        if ":" in name:  # dotted path for one-off code: "mypkg.rewards:score"
            return ComponentInfo(kind, name, resolve_dotted(name), "<dotted path>", "", name)
        info = self._items[kind].get(name)
        if info is not None:
            return info
        msg = f"unknown {kind} '{name}'"
        pkg = KNOWN_PLUGIN_PACKAGES.get(name)
        if pkg:
            msg += f": it is provided by {pkg} (pip install {pkg})"
        else:
            close = difflib.get_close_matches(name, self.names(kind), n=1)
            msg += f"; did you mean '{close[0]}'?" if close else f"; available: {', '.join(self.names(kind)) or 'none'}"
        if self.broken:
            msg += " [broken plugins: " + "; ".join(self.broken.values()) + "]"
        raise PluginError(msg)

    def create(self, kind: str, name: str, **kwargs: Any) -> Any:
        info = self.get(kind, name)
        obj = info.obj
        if kind == "reward" and ":" in name and not isinstance(obj, type):
            from .components.rewards import CallableReward

            return CallableReward(obj, name=name, **kwargs)
        try:
            return obj(**kwargs)
        except TypeError as exc:
            raise PluginError(f"{kind} '{name}' does not accept arguments {sorted(kwargs)}: {exc}") from exc

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
        _DEFAULT = Registry(pm, broken)
    return _DEFAULT

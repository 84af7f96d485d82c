"""Resolve a config into a plan: which registered component fills each hook point, with which arguments.
No weights are loaded here (``trl-video train --dry-run`` prints the plan)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .config import VideoRewardConfig, check_fields
from .errors import ConfigError, TrlVideoError
from .plugins import HOOK_POINTS, ComponentInfo, MethodSpec, Registry


@dataclass
class Plan:
    method: MethodSpec
    method_config: Any
    components: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    infos: dict[str, ComponentInfo] = field(default_factory=dict)

    def describe(self) -> str:
        from .recipe_io import redact

        lines = [f"method    {self.method.name}: {self.method.description}"]
        for kind in HOOK_POINTS:
            name, args = self.components[kind]
            info = self.infos.get(kind)
            src = f"{info.distribution} {info.version}".strip() if info else ""
            lines.append(f"{kind:<10}{name:<14}{redact(args)}  [{src}]")
        lines.append(f"config    {dataclasses.asdict(self.method_config)}")
        return "\n".join(lines)


def resolve_plan(config: VideoRewardConfig, registry: Registry) -> Plan:
    spec = registry.method(config.method)
    method_args = check_fields(spec.config_cls, config.method_args, f"method_args ({config.method})")
    try:
        method_config = spec.config_cls(**method_args)
    except ConfigError as exc:
        raise ConfigError(f"method '{config.method}': {exc}", key=exc.key) from None
    except (TypeError, ValueError) as exc:
        raise TrlVideoError(f"method_args ({config.method}): {exc}") from exc
    plan = Plan(spec, method_config)
    for kind in HOOK_POINTS:
        override = getattr(config, kind)
        name = override or spec.defaults.get(kind) or {"replay": "fresh", "estimator": "none"}.get(kind)
        if name is None:
            raise TrlVideoError(f"method '{spec.name}' names no default {kind} and the recipe sets none")
        args = dict(spec.default_args.get(kind, {})) if not override or override == spec.defaults.get(kind) else {}
        args.update(getattr(config, f"{kind}_args"))
        if kind == "reward":
            for part in name.split("+"):
                plan.infos.setdefault(kind, registry.get("reward", part))
        else:
            plan.infos[kind] = registry.get(kind, name)
        plan.components[kind] = (name, args)
    return plan


def build_reward(registry: Registry, name: str, args: dict[str, Any]):
    from .components.rewards import WeightedSum

    if "+" not in name:
        return registry.create("reward", name, **args)
    weights = args.get("weights", {})
    parts = {}
    for part in name.split("+"):
        parts[part] = (registry.create("reward", part, **args.get(part, {})), float(weights.get(part, 1.0)))
    return WeightedSum(parts)

"""Up-front validation of a whole training configuration, shared by ``trl-video train --dry-run`` and
``train`` (and by :class:`~trl_video.VideoRewardTrainer`), so a dry run that passes means the run starts.

Nothing here loads weights: model geometry comes from the config files of the model folder (or the known
shapes of the shipped presets and hub aliases), component arguments are checked against the constructors'
signatures, and the cheap components (sampler, estimator, replay, loss) are built once so their own checks run.
Every problem raises :class:`~trl_video.errors.TrlVideoError` whose message names the key at fault.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import TrlVideoError

#: lr schedules that need more than (optimizer, warmup, total steps) or a metric in ``step()``
UNSUPPORTED_SCHEDULERS = ("reduce_lr_on_plateau",)


@dataclass(frozen=True)
class Geometry:
    """What a model can take: pixels per latent cell, frames per latent frame, transformer patch, RoPE size."""

    spatial: int
    temporal: int
    patch: int
    rope_max: int | None = None  # Wan: positions per axis the rotary embedding covers


# the hub models' geometry (their config files are not reachable in a dry run)
HUB_GEOMETRY = {"wan": Geometry(8, 4, 2, 1024), "cogvideox": Geometry(8, 4, 2)}


def check_fields(config: Any) -> None:
    """Rules the field declarations cannot express (numeric bounds and choices are checked by
    :class:`~trl_video.config.ConfigBase` when the config is built)."""
    for name in ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
                 "ema_decay"):
        value = getattr(config, name)
        if not math.isfinite(value):
            raise TrlVideoError(f"{name} must be a finite number, got {value}")
    if config.use_peft:
        mods = config.lora_target_modules
        if not mods or not all(isinstance(m, str) and m for m in mods):
            raise TrlVideoError(f"lora_target_modules must be a non-empty list of module names, got {mods!r}")
    for name in ("model", "method", "reward", "output_dir", "prompts", "prompt_column", "eval_prompts"):
        if not str(getattr(config, name)).strip():
            raise TrlVideoError(f"{name} must not be empty")
    check_scheduler(config.lr_scheduler_type)
    if config.push_to_hub and not config.hub_model_id:
        raise TrlVideoError("push_to_hub needs hub_model_id (e.g. user/my-video-model)")
    if config.hub_model_id is not None and str(config.hub_model_id).count("/") != 1:
        raise TrlVideoError(f"hub_model_id must look like 'user/name', got '{config.hub_model_id}'")


def check_scheduler(name: str) -> None:
    """The scheduler is built once on a throwaway optimiser: exactly what the trainer does later."""
    import torch
    from transformers import SchedulerType, get_scheduler

    choices = [s.value for s in SchedulerType if s.value not in UNSUPPORTED_SCHEDULERS]
    if name not in choices:
        import difflib

        close = difflib.get_close_matches(name, choices, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; choices: {', '.join(choices)}"
        raise TrlVideoError(f"lr_scheduler_type: unknown scheduler '{name}'{hint}")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        get_scheduler(name, opt, num_warmup_steps=0, num_training_steps=1)
    except (ValueError, TypeError) as exc:
        raise TrlVideoError(f"lr_scheduler_type '{name}' needs arguments the recipe cannot give: "
                            f"{str(exc).splitlines()[0]}") from None


# ------------------------------------------------------------------------------------------------ components
def _accepts(obj: Any, args: dict[str, Any], where: str) -> None:
    """``obj(**args)`` binds: unknown or missing keyword arguments name the recipe key."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins without a signature: nothing to check
        return
    try:
        sig.bind(**args)
    except TypeError as exc:
        names = [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [k for k in args if k not in names]
        if unknown and not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            import difflib

            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; accepted: {', '.join(names) or 'none'}"
            raise TrlVideoError(f"{where}: unknown argument '{unknown[0]}'{hint}") from None
        raise TrlVideoError(f"{where}: {exc}") from None


def _reward_parts(registry: Any, name: str, args: dict[str, Any]) -> list[tuple[str, Any, dict[str, Any]]]:
    """(part name, registered object, its arguments) of a reward or an ``a+b`` sum."""
    if "+" not in name:
        return [(name, registry.get("reward", name).obj, args)]
    parts = name.split("+")
    extra = [k for k in args if k not in parts and k != "weights"]
    if extra:
        raise TrlVideoError(f"reward_args: unknown key '{extra[0]}' for the reward sum '{name}' "
                            f"(expected one of {parts} or 'weights')")
    weights = args.get("weights", {})
    if not isinstance(weights, dict) or any(k not in parts for k in weights):
        raise TrlVideoError(f"reward_args.weights must map parts of '{name}' to numbers, got {weights!r}")
    for k, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise TrlVideoError(f"reward_args.weights.{k} must be a finite number, got {w!r}")
    out = []
    for part in parts:
        sub = args.get(part, {})
        if not isinstance(sub, dict):
            raise TrlVideoError(f"reward_args.{part} must be a mapping of arguments, got {type(sub).__name__}")
        out.append((part, registry.get("reward", part).obj, sub))
    return out


def reward_declares(obj: Any, args: dict[str, Any], attr: str, default: Any) -> Any:
    """A reward's declared ``space``/``differentiable`` without building it (dotted-path callables may set
    them through reward_args)."""
    if attr in args and not isinstance(obj, type):
        return args[attr]
    return getattr(obj, attr, default)


def check_components(config: Any, plan: Any, registry: Any) -> dict[str, Any]:
    """Arguments of every component bind; cheap components are built once (their own checks run).
    Returns the built objects by hook point (the reward is never built here: it may load a model)."""
    from .components.rewards import CallableReward

    built: dict[str, Any] = {}
    for kind in ("sampler", "estimator", "replay", "loss"):
        name, args = plan.components[kind]
        obj = plan.infos[kind].obj
        _accepts(obj, args, f"{kind}_args ({kind} '{name}')")
        try:
            built[kind] = obj(**args)
        except TrlVideoError:
            raise
        except (TypeError, ValueError, KeyError, AssertionError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TrlVideoError(f"{kind}_args ({kind} '{name}'): {msg}") from None
    name, args = plan.components["reward"]
    parts = _reward_parts(registry, name, args)
    for part, obj, sub in parts:
        where = f"reward_args ({'reward' if part == name else f'reward {name}, part'} '{part}')"
        if "://" in part:  # a URL: the component registered for its scheme is built with url=<the name>
            _accepts(obj, {"url": part, **sub}, where)
        elif ":" in part and not isinstance(obj, type):
            if not callable(obj):
                raise TrlVideoError(f"reward '{part}' is not callable ({type(obj).__name__})")
            _accepts(CallableReward, {"fn": obj, **sub}, where)
        else:
            _accepts(obj, sub, where)
        space = reward_declares(obj, sub, "space", "pixel")
        if space not in ("pixel", "latent"):
            raise TrlVideoError(f"reward '{part}' declares space '{space}' (expected pixel or latent)")
    loss = built["loss"]
    if getattr(loss, "reward_grad", False):
        for part, obj, sub in parts:
            if not reward_declares(obj, sub, "differentiable", ":" not in part):
                raise TrlVideoError(f"reward '{part}' is not differentiable, but method '{config.method}' (loss "
                                    f"'{plan.components['loss'][0]}') backpropagates through the reward; use a "
                                    f"differentiable reward or a policy-gradient method")
    replay_needs_rollouts = getattr(built["replay"], "needs_rollouts", True)
    uses_adv = getattr(loss, "uses_advantages", True)  # a loss may say which of its settings read advantages
    uses_adv = uses_adv(plan.method_config) if callable(uses_adv) else bool(uses_adv)
    if (getattr(built["estimator"], "needs_groups", False) and uses_adv and replay_needs_rollouts
            and config.group_size < 2):
        raise TrlVideoError(f"group_size is {config.group_size}, but estimator '{plan.components['estimator'][0]}' "
                            f"normalises within groups of samples of one prompt (every advantage would be 0); "
                            f"set group_size >= 2")
    if not replay_needs_rollouts and not config.offline_latents:
        raise TrlVideoError(f"replay '{plan.components['replay'][0]}' needs offline latents: set offline_latents")
    if (plan.components["sampler"][1].get("behaviour") == "ema" and not config.ema_decay
            and loss.ema_schedule("policy") is None):  # a loss may keep the policy EMA on its own schedule
        raise TrlVideoError("sampler_args.behaviour 'ema' needs policy EMA: set ema_decay > 0")
    for i, extra in enumerate(config.eval_rewards):
        try:
            _reward_parts(registry, extra, {})
        except TrlVideoError as exc:
            raise TrlVideoError(f"eval_rewards[{i}]: {exc}") from None
    return built


# ------------------------------------------------------------------------------------------------ model / data
def model_geometry(model: str) -> tuple[Geometry, str] | None:
    """Geometry of a preset, a local pipeline folder or a known hub model; None when it cannot be known
    without downloading (an arbitrary hub id)."""
    from .models.presets import ASSETS, HUB_ALIASES, PRESETS

    if model in HUB_ALIASES:
        return HUB_GEOMETRY["wan" if "wan" in model else "cogvideox"], "wan" if "wan" in model else "cogvideox"
    if model in PRESETS:  # tiny presets: the random variants share the shipped architecture
        family = "wan" if "wan" in model else "cogvideox"
        folder = ASSETS / f"tiny-{family}"
    else:
        folder = Path(model).expanduser()
        if folder.is_dir() and not (folder / "model_index.json").exists():
            raise TrlVideoError(f"model folder '{folder}' has no model_index.json (not a diffusers pipeline folder)")
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text())
        tr = json.loads((folder / "transformer" / "config.json").read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise TrlVideoError(f"model folder '{folder}': a config.json is not valid JSON ({exc.msg})") from None
    if "z_dim" in vae:  # AutoencoderKLWan
        patch = tr.get("patch_size", [1, 2, 2])
        geo = Geometry(int(vae.get("scale_factor_spatial", 8)), int(vae.get("scale_factor_temporal", 4)),
                       int(patch[-1]), tr.get("rope_max_seq_len"))
        return geo, "wan"
    spatial = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    return Geometry(spatial, int(vae.get("temporal_compression_ratio", 4)), int(tr.get("patch_size", 2))), "cogvideox"


def check_model_geometry(config: Any) -> None:
    found = model_geometry(config.model)
    if found is None:
        return
    geo, family = found
    cell = geo.spatial * geo.patch
    for name in ("height", "width"):
        value = getattr(config, name)
        if value is not None and value % cell:
            raise TrlVideoError(f"{name} {value} is not a multiple of {cell} (VAE x{geo.spatial} times patch "
                                f"{geo.patch}) for model '{config.model}'")
        if value is not None and geo.rope_max is not None and value // cell > geo.rope_max:
            raise TrlVideoError(f"{name} {value} is too large for model '{config.model}': at most "
                                f"{geo.rope_max * cell} (rotary embedding of {geo.rope_max} positions)")
    if config.num_frames is not None:
        f = config.num_frames
        if (f - 1) % geo.temporal:
            raise TrlVideoError(f"num_frames {f} cannot be taken by model '{config.model}': the VAE needs "
                                f"{geo.temporal}k+1 frames (e.g. {geo.temporal * ((f - 1) // geo.temporal) + 1})")
        if geo.rope_max is not None and (f - 1) // geo.temporal + 1 > geo.rope_max:
            raise TrlVideoError(f"num_frames {f} is too large for model '{config.model}': at most "
                                f"{geo.temporal * (geo.rope_max - 1) + 1}")


def check_sources(config: Any) -> None:
    """Local files named by the recipe exist (no weights, no network). A missing dataset or model that a checkout
    benchmark builds (its ``BUILDS``) is reported with the command that builds it."""
    from .bench_discovery import missing_path_hint
    from .models.presets import PRESETS

    for key in ("prompts", "eval_prompts"):
        src = getattr(config, key)
        if src.startswith("world:"):
            if src.split(":", 1)[1] not in ("train", "heldout"):
                raise TrlVideoError(f"{key}: unknown built-in prompt set '{src}' (world:train or world:heldout)")
        elif src.startswith((".", "/", "~")) or Path(src).suffix:
            if not Path(src).expanduser().exists():
                raise TrlVideoError(f"{key}: file or folder not found: {src}")
    if getattr(config, "prompt_embeds", None) and not Path(config.prompt_embeds).is_dir():
        raise TrlVideoError(f"prompt_embeds: folder not found: {config.prompt_embeds}")
    for i, entry in enumerate((getattr(config, "prompt_datasets", None) or {}).get("datasets") or []):
        files = entry.get("data_files") if isinstance(entry, dict) else None
        for f in [files] if isinstance(files, str) else (files or []):
            if isinstance(f, str) and not Path(f).exists():
                raise TrlVideoError(f"prompt_datasets.datasets[{i}].data_files: file not found: {f}")
    if config.offline_latents and not Path(config.offline_latents).expanduser().exists():
        raise TrlVideoError(f"offline_latents: folder not found: {config.offline_latents}"
                            f"{missing_path_hint(config.offline_latents)}")
    m = config.model
    if m not in PRESETS and (m.startswith((".", "/")) or m.count("/") != 1) and not Path(m).exists():
        raise TrlVideoError(f"model: '{m}' is neither a preset, an existing folder, nor a hub id{missing_path_hint(m)}")


def validate_config(config: Any, plan: Any, registry: Any, check_model: bool = True) -> dict[str, Any]:
    """Everything that can be checked before weights load. ``check_model=False`` when the caller brings its
    own policy object. Returns the components built while checking (see :func:`check_components`)."""
    check_fields(config)
    check_sources(config)
    if check_model:
        check_model_geometry(config)
    built = check_components(config, plan, registry)
    # divisible by the number of processes; read from the launcher's environment, because creating accelerate's
    # PartialState here (before the trainer's Accelerator) would fix its settings too early
    import os

    n = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if config.global_batch % n:
        raise TrlVideoError(f"prompts_per_step*group_size = {config.global_batch} is not divisible by the {n} "
                            f"processes")
    return built

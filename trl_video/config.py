"""``VideoRewardConfig``: every training option, documented TRL-style (dataclass + ``metadata['help']``)."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import TrlVideoError


def doc_field(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with TRL-style ``metadata['help']``; list/dict defaults are copied per instance.
    Plugins use it for their config dataclasses too."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class VideoRewardConfig:
    r"""Configuration of :class:`~trl_video.VideoRewardTrainer`.

    A recipe YAML is a mapping of these fields. Components (sampler, estimator, loss, replay, reward) default
    to the method's bundle; ``*_args`` mappings are passed to the component constructors; ``method_args`` is
    validated against the method's own config dataclass.
    """

    # ---- what to train
    model: str = doc_field("tiny-cogvideox", "Preset (tiny-cogvideox, tiny-wan, ...), local diffusers pipeline folder, or hub id.")
    method: str = doc_field("refl", "Registered method name (`trl-video plugins` lists them), e.g. refl, fcrm, velr.")
    method_args: dict[str, Any] = doc_field({}, "Fields of the method's config dataclass (see the plugin's README).")
    reward: str = doc_field("alignment", "Registered reward name, `a+b` for a sum, or a dotted path `pkg.mod:fn`.")
    reward_args: dict[str, Any] = doc_field({}, "Keyword arguments of the reward constructor; for `a+b`: {a: {...}, weights: {a: 1}}.")
    sampler: str | None = doc_field(None, "Sampler override (default: the method's).")
    sampler_args: dict[str, Any] = doc_field({}, "Keyword arguments of the sampler (num_steps, eta, grad_steps, ...).")
    estimator: str | None = doc_field(None, "Estimator override (default: the method's).")
    estimator_args: dict[str, Any] = doc_field({}, "Keyword arguments of the estimator.")
    loss: str | None = doc_field(None, "Loss override (default: the method's).")
    loss_args: dict[str, Any] = doc_field({}, "Keyword arguments of the loss constructor.")
    replay: str | None = doc_field(None, "Replay override (default: the method's).")
    replay_args: dict[str, Any] = doc_field({}, "Keyword arguments of the replay component.")

    # ---- data
    prompts: str = doc_field("world:train", "Prompt source: `world:train`, `world:heldout`, a json/jsonl/csv/parquet file, "
                                      "a dataset saved with save_to_disk, or a hub dataset id.")
    prompt_column: str = doc_field("prompt", "Column holding the prompt text.")
    offline_latents: str | None = doc_field(None, "Folder of an offline-latents dataset (save_to_disk) with columns prompt, "
                                           "latents[, reward, source].")
    num_frames: int | None = doc_field(None, "Override the number of video frames (must be 4k+1 for the real VAEs).")
    height: int | None = doc_field(None, "Override the video height in pixels.")
    width: int | None = doc_field(None, "Override the video width in pixels.")

    # ---- optimisation
    max_steps: int = doc_field(100, "Number of training steps (policy optimiser updates).")
    prompts_per_step: int = doc_field(4, "Distinct prompts per step (all processes together).")
    group_size: int = doc_field(2, "Samples per prompt (G); groups may span processes.")
    gradient_accumulation_steps: int = doc_field(1, "Micro-batches accumulated per optimiser step.")
    learning_rate: float = doc_field(1e-4, "Learning rate of the policy (auxiliary modules set their own).")
    weight_decay: float = doc_field(0.0, "AdamW weight decay.")
    adam_beta1: float = doc_field(0.9, "AdamW beta1.")
    adam_beta2: float = doc_field(0.999, "AdamW beta2.")
    adam_epsilon: float = doc_field(1e-8, "AdamW epsilon.")
    lr_scheduler_type: str = doc_field("constant", "transformers scheduler name: constant, linear, cosine, "
                                            "constant_with_warmup, ...")
    warmup_steps: int = doc_field(0, "Warm-up steps of the LR schedule.")
    max_grad_norm: float = doc_field(1.0, "Gradient clipping norm (0 disables).")
    use_lora: bool = doc_field(True, "Train a LoRA adapter (reference = base with the adapter disabled); else full fine-tuning.")
    lora_rank: int = doc_field(8, "LoRA rank.")
    lora_alpha: float | None = doc_field(None, "LoRA alpha (default: the rank).")
    lora_target_modules: list[str] = doc_field(["to_q", "to_k", "to_v", "to_out.0"], "Modules that get LoRA adapters.")
    gradient_checkpointing: bool = doc_field(False, "Enable gradient checkpointing in the transformer.")
    ema_decay: float = doc_field(0.0, "Keep an EMA of the policy's trainable weights with this decay (0 = off).")
    mixed_precision: str = doc_field("no", "accelerate mixed precision: no | bf16 | fp16.")
    seed: int = doc_field(0, "Random seed (prompt order, noise, initialisation).")

    # ---- logging / saving
    output_dir: str = doc_field("out/run", "Where checkpoints, logs, samples and the final model go.")
    logging_steps: int = doc_field(1, "Log every N steps (TensorBoard + metrics.jsonl).")
    save_steps: int = doc_field(0, "Checkpoint every N steps (0: only at the end).")
    save_total_limit: int | None = doc_field(2, "Keep at most this many checkpoints.")
    report_to: str = doc_field("tensorboard", "tensorboard | none.")
    save_model_at_end: bool = doc_field(True, "Write a diffusers pipeline folder to output_dir/model at the end.")

    # ---- evaluation
    eval_at_end: bool = doc_field(False, "Run `trl-video eval` (before/after rewards, GIFs, JSON) when training ends.")
    eval_prompts: str = doc_field("world:heldout", "Prompt source for evaluation.")
    eval_num_prompts: int = doc_field(32, "Number of (prompt, seed) pairs evaluated.")
    eval_num_steps: int = doc_field(20, "ODE steps used to sample at evaluation.")
    eval_rewards: list[str] = doc_field([], "Extra reward names reported at evaluation (the training reward is always).")

    # ---- hub
    push_to_hub: bool = doc_field(False, "Push the final model folder (with model card) to the Hub.")
    hub_model_id: str | None = doc_field(None, "Repository id for push_to_hub, e.g. user/name.")
    hub_private: bool = doc_field(False, "Create the Hub repository as private.")
    trust_remote_code: bool = doc_field(False, "Allow custom code from model repositories (off by default).")

    def __post_init__(self) -> None:
        for name in ("max_steps", "prompts_per_step", "group_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise TrlVideoError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise TrlVideoError(f"mixed_precision must be no|bf16|fp16, got '{self.mixed_precision}'")
        if self.report_to not in ("tensorboard", "none"):
            raise TrlVideoError(f"report_to must be tensorboard|none, got '{self.report_to}'")
        if self.learning_rate <= 0:
            raise TrlVideoError(f"learning_rate must be > 0, got {self.learning_rate}")

    @property
    def global_batch(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def per_process_batch(self) -> int:
        from accelerate.state import PartialState

        n = PartialState().num_processes
        if self.global_batch % n:
            raise TrlVideoError(f"prompts_per_step*group_size = {self.global_batch} is not divisible by the "
                                f"{n} processes")
        return self.global_batch // n

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------ validation
def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _accepts_float(tp: Any) -> bool:
    if tp is float:
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp)


def check_fields(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """Unknown keys -> "did you mean"; wrong types name the key. Returns data with ints coerced to floats."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise TrlVideoError(f"{where}: unknown key '{key}'{hint}")
        tp = hints[key]
        if isinstance(value, str) and _accepts_float(tp):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if not _type_ok(value, tp):
            pretty = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
            raise TrlVideoError(f"{where}: key '{key}' must be {pretty}, got {type(value).__name__} {value!r}")
        if tp is float and isinstance(value, int):
            value = float(value)
        out[key] = value
    return out


def config_from_dict(data: dict[str, Any], where: str = "recipe") -> VideoRewardConfig:
    clean = check_fields(VideoRewardConfig, data, where)
    try:
        return VideoRewardConfig(**clean)
    except TrlVideoError as exc:
        raise TrlVideoError(f"{where}: {exc}") from None

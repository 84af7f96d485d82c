"""Configuration dataclasses: the shared base every config derives from, and ``VideoRewardConfig``.

One way to write a config (the trainer's and every method's ``method_args``):

* a ``@dataclass`` subclass of :class:`ConfigBase` (methods: :class:`MethodConfig`);
* every field made with :func:`doc_field` (TRL-style ``metadata['help']``; numeric bounds ``ge``/``gt``/``le``/
  ``lt`` are checked generically);
* a fixed set of choices is a ``Literal[...]`` type (checked generically, listed by ``--help``);
* rules between fields go in ``validate()`` (call ``super().validate()`` first; report with ``self.fail(key, ...)``
  so the message names the key).

Recipes and command lines are parsed with ``trl.TrlParser`` (see :mod:`trl_video.cli` and
:func:`config_from_dict`); LoRA settings use ``trl.ModelConfig``'s field names and become a peft ``LoraConfig``
through ``trl.get_peft_config``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import operator
import types
import typing
import warnings
from dataclasses import InitVar, dataclass, field
from typing import Any, ClassVar, Literal, NoReturn

from .errors import ConfigError, TrlVideoError

#: numeric bounds a field may declare in ``doc_field(..., ge=1)``: metadata key -> (test, wording)
BOUNDS: dict[str, tuple[Any, str]] = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"),
                                      "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def doc_field(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with TRL-style ``metadata['help']``; list/dict defaults are copied per instance.

    ``kw``: numeric bounds (``ge``, ``gt``, ``le``, ``lt``; checked by :meth:`ConfigBase.validate`, ``None``
    values skip them) or further argparse keywords (``aliases``, ``metavar``)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=functools.partial(copy.copy, default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def literal_choices(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` (or ``Literal[...] | None``) type, else None."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if typing.get_origin(arg) is Literal:
                return typing.get_args(arg)
    return None


@dataclass
class ConfigBase:
    """Base of every trl-video config dataclass: generic checks of ``Literal`` choices and numeric bounds,
    ``validate()`` for rules between fields, errors that name the key (:class:`~trl_video.errors.ConfigError`)."""

    #: prefix of keys in error messages ("method_args." for a method's config)
    key_prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field's ``Literal`` choices and ``ge``/``gt``/``le``/``lt`` bounds. Subclasses add their
        cross-field rules after ``super().validate()``."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            choices = literal_choices(hints[f.name])
            if choices is not None and value not in choices:
                self.fail(f.name, f"must be one of {'|'.join(str(c) for c in choices)}")
            for key, (test, word) in BOUNDS.items():
                bound = f.metadata.get(key)
                if bound is not None and isinstance(value, (int, float)) and not test(value, bound):
                    self.fail(f.name, f"must be {word} {bound}")

    def fail(self, key: str, requirement: str, value: Any = dataclasses.MISSING) -> NoReturn:
        """Raise ``ConfigError("<prefix><key> <requirement>, got <value>")``."""
        got = getattr(self, key, None) if value is dataclasses.MISSING else value
        raise ConfigError(f"{self.key_prefix}{key} {requirement}, got {got!r}", key=f"{self.key_prefix}{key}")

    def require(self, ok: bool, key: str, requirement: str) -> None:
        """``self.fail(key, requirement)`` unless ``ok``."""
        if not ok:
            self.fail(key, requirement)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> Any:
        """Build from a mapping: unknown keys get a "did you mean", wrong types name the key."""
        clean = check_fields(cls, data, where)
        try:
            return cls(**clean)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}", key=exc.key) from None


@dataclass
class MethodConfig(ConfigBase):
    """Base of a method's config (the recipe's ``method_args``); see the module docstring for the rules."""

    key_prefix: ClassVar[str] = "method_args."


#: accelerate's tracker names (``accelerate.utils.LoggerType``) accepted by ``report_to``
TRACKERS = ("all", "tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab")

#: deprecated recipe keys -> (VideoRewardConfig field, note). The LoRA keys follow ``trl.ModelConfig`` now.
ALIASES: dict[str, tuple[str, str]] = {
    "use_lora": ("use_peft", "trl.ModelConfig name"),
    "lora_rank": ("lora_r", "trl.ModelConfig name"),
}


@dataclass
class VideoRewardConfig(ConfigBase):
    r"""Configuration of :class:`~trl_video.VideoRewardTrainer`.

    A recipe YAML is a mapping of these fields (parsed with ``trl.TrlParser``; every field is also a command-line
    flag of ``trl-video train``). Components (sampler, estimator, loss, replay, reward) default to the method's
    bundle; ``*_args`` mappings are passed to the component constructors; ``method_args`` is validated against the
    method's own config dataclass. LoRA fields carry ``trl.ModelConfig``'s names (``use_peft``, ``lora_r``, ...);
    the old recipe keys ``use_lora`` / ``lora_rank`` are accepted with a deprecation note.
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
    score_async: bool = doc_field(False, "Score each batch (decode + reward) in a background worker while the next batch "
                                         "is sampled: hides a slow or remote reward behind sampling. The next step's "
                                         "batch then comes from the policy one update older (one-step off-policy, as "
                                         "in asynchronous RL trainers). Only for losses that keep no sampling graph.")

    # ---- data
    prompts: str = doc_field("world:train", "Prompt source: `world:train`, `world:heldout`, a json/jsonl/csv/parquet file, "
                                      "a dataset saved with save_to_disk, or a hub dataset id.")
    prompt_datasets: dict[str, Any] = doc_field({}, "A TRL dataset mixture (trl.DatasetMixtureConfig: {datasets: [{path, "
                                                  "name, data_files, split, columns, fraction}], streaming, "
                                                  "test_split_size}); when set, used instead of `prompts`.")
    prompt_column: str = doc_field("prompt", "Column holding the prompt text.")
    offline_latents: str | None = doc_field(None, "Folder of an offline-latents dataset (save_to_disk) with columns prompt, "
                                           "latents[, reward, source].")
    num_frames: int | None = doc_field(None, "Override the number of video frames (must be 4k+1 for the real VAEs).", ge=1)
    height: int | None = doc_field(None, "Override the video height in pixels.", ge=1)
    width: int | None = doc_field(None, "Override the video width in pixels.", ge=1)

    prompt_embeds: str | None = doc_field(None, "Folder of pre-encoded prompt embeddings (`trl-video encode-prompts`, "
                                         "an HF dataset saved with save_to_disk): prompts found there are read from "
                                         "it (memory-mapped) instead of running the text encoder.")
    text_cache_size: int = doc_field(1024, "Text embeddings kept in the in-memory LRU cache (on the CPU); 0 disables "
                                          "the cache.", ge=0)

    # ---- optimisation
    max_steps: int = doc_field(100, "Number of training steps (policy optimiser updates).", ge=1)
    prompts_per_step: int = doc_field(4, "Distinct prompts per step (all processes together).", ge=1)
    group_size: int = doc_field(2, "Samples per prompt (G); groups may span processes.", ge=1)
    gradient_accumulation_steps: int = doc_field(1, "Micro-batches accumulated per optimiser step.", ge=1)
    learning_rate: float = doc_field(1e-4, "Learning rate of the policy (auxiliary modules set their own).", gt=0)
    weight_decay: float = doc_field(0.0, "AdamW weight decay.", ge=0.0)
    adam_beta1: float = doc_field(0.9, "AdamW beta1.", ge=0.0, lt=1.0)
    adam_beta2: float = doc_field(0.999, "AdamW beta2.", ge=0.0, lt=1.0)
    adam_epsilon: float = doc_field(1e-8, "AdamW epsilon.", gt=0.0)
    lr_scheduler_type: str = doc_field("constant", "transformers scheduler name: constant, linear, cosine, "
                                            "constant_with_warmup, ...")
    warmup_steps: int = doc_field(0, "Warm-up steps of the LR schedule.", ge=0)
    max_grad_norm: float = doc_field(1.0, "Gradient clipping norm (0 disables).", ge=0.0)
    gradient_checkpointing: bool = doc_field(False, "Enable gradient checkpointing in the transformer.")
    ema_decay: float = doc_field(0.0, "Keep an EMA of the policy's trainable weights with this decay (0 = off).", ge=0.0, lt=1.0)
    mixed_precision: Literal["no", "bf16", "fp16"] = doc_field(
        "no", "no | bf16 | fp16: frozen weights (text encoder, VAE, frozen transformer base / reference) are loaded "
              "in this dtype and forward passes run under autocast; fp16 adds a dynamic loss scaler (inf steps "
              "skipped and counted).")
    trainable_dtype: Literal["fp32", "bf16"] = doc_field(
        "fp32", "fp32 | bf16: dtype of the trainable parameters (LoRA or full) and thus of their gradients and AdamW "
                "states; fp32 (master weights) is the default.")
    grad_sync_bucket_mb: float = doc_field(25.0, "Gradients are averaged across ranks in place, small ones packed in "
                                                "buckets of at most this many MiB (the only extra memory of the sync).",
                                           gt=0)
    fsdp: bool = doc_field(False, "Shard the transformer (and block-structured auxiliary models such as a fake score) "
                                  "per block + root with torch FSDP2 `fully_shard` over all processes; also on when "
                                  "the accelerate config says distributed_type: FSDP. See recipes/accelerate/.")
    fsdp_config: dict[str, Any] = doc_field({}, "FSDP2 options: reshard_after_forward (bool, default true), "
                                                "shard_size (int: HSDP, shard within groups of this many ranks and "
                                                "replicate across them; 0 = all ranks).")
    seed: int = doc_field(0, "Random seed (prompt order, noise, initialisation).", ge=0, le=2**32 - 1)

    # ---- LoRA: trl.ModelConfig's fields, turned into a peft LoraConfig by trl.get_peft_config
    use_peft: bool = doc_field(True, "Train a LoRA adapter (reference = the base with the adapter disabled); false: full "
                                     "fine-tuning (reference = a frozen copy). Was `use_lora`.")
    lora_r: int = doc_field(8, "LoRA rank. Was `lora_rank`.", ge=1)
    lora_alpha: float | None = doc_field(None, "LoRA alpha (default: lora_r, i.e. scale 1).", gt=0.0)
    lora_dropout: float = doc_field(0.0, "LoRA dropout.", ge=0.0, lt=1.0)
    lora_target_modules: list[str] = doc_field(["to_q", "to_k", "to_v", "to_out.0"], "Modules that get LoRA adapters.")
    use_rslora: bool = doc_field(False, "Rank-stabilised LoRA: scale lora_alpha / sqrt(r) instead of lora_alpha / r.")
    use_dora: bool = doc_field(False, "Weight-decomposed LoRA (DoRA).")

    # ---- logging / saving
    output_dir: str = doc_field("out/run", "Where checkpoints, logs, samples and the final model go.")
    logging_steps: int = doc_field(1, "Log every N steps (trackers + metrics.jsonl).", ge=1)
    save_steps: int = doc_field(0, "Checkpoint every N steps (0: only at the end).", ge=0)
    save_total_limit: int | None = doc_field(2, "Keep at most this many checkpoints.", ge=1)
    report_to: str | list[str] = doc_field("tensorboard", "Trackers (accelerate's): tensorboard (default), wandb, trackio, "
                                                     "comet_ml, mlflow, aim, clearml, dvclive, swanlab; a list or "
                                                     "a comma-separated string; all = every installed one; none.")
    save_model_at_end: bool = doc_field(True, "Write a diffusers pipeline folder to output_dir/model at the end.")

    # ---- evaluation
    eval_at_end: bool = doc_field(False, "Run `trl-video eval` (before/after rewards, GIFs, JSON) when training ends.")
    eval_prompts: str = doc_field("world:heldout", "Prompt source for evaluation.")
    eval_num_prompts: int = doc_field(32, "Number of (prompt, seed) pairs evaluated.", ge=1)
    eval_num_steps: int = doc_field(20, "ODE steps used to sample at evaluation.", ge=1)
    eval_rewards: list[str] = doc_field([], "Extra reward names reported at evaluation (the training reward is always).")

    # ---- hub
    push_to_hub: bool = doc_field(False, "Push the final model folder (with model card) to the Hub.")
    hub_model_id: str | None = doc_field(None, "Repository id for push_to_hub, e.g. user/name.")
    hub_private: bool = doc_field(False, "Create the Hub repository as private.")
    trust_remote_code: bool = doc_field(False, "Allow custom code from model repositories (off by default).")

    # ---- deprecated keyword arguments (not fields): mapped onto the trl.ModelConfig names with a note
    use_lora: InitVar[bool | None] = None
    lora_rank: InitVar[int | None] = None

    def __post_init__(self, use_lora: bool | None = None, lora_rank: int | None = None) -> None:  # type: ignore[override]
        for old, value in (("use_lora", use_lora), ("lora_rank", lora_rank)):
            if value is not None:
                new = ALIASES[old][0]
                warnings.warn(deprecation_note(old), FutureWarning, stacklevel=3)
                setattr(self, new, value)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.prompt_datasets:
            from trl import DatasetMixtureConfig

            try:
                DatasetMixtureConfig(**copy.deepcopy(self.prompt_datasets))  # it converts entries in place
            except TypeError as exc:
                self.fail("prompt_datasets", f"must be a trl.DatasetMixtureConfig mapping ({exc})")
        unknown = [t for t in self.trackers if t not in TRACKERS]
        if unknown or (isinstance(self.report_to, list) and not self.report_to):
            self.fail("report_to", f"must name trackers among {'|'.join(TRACKERS)} (or none)")

    @property
    def trackers(self) -> list[str]:
        """``report_to`` as a list of accelerate tracker names (empty for none)."""
        names = self.report_to.split(",") if isinstance(self.report_to, str) else list(self.report_to)
        names = [str(n).strip() for n in names if str(n).strip()]
        return [] if names == ["none"] else names

    def check_trackers_installed(self) -> None:
        """Every tracker named in ``report_to`` can be imported (accelerate would silently drop a missing one)."""
        from accelerate.tracking import get_available_trackers

        available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
        for name in self.trackers:
            if name != "all" and name not in available:
                raise ConfigError(f"report_to: tracker '{name}' is not installed (pip install {name}; installed: "
                                  f"{', '.join(sorted(available)) or 'none'})", key="report_to")

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

    # ---- LoRA through TRL
    def model_config(self) -> Any:
        """This config's model/LoRA settings as a ``trl.ModelConfig``."""
        return model_config_for(self.model, use_peft=self.use_peft, lora_r=self.lora_r, lora_alpha=self.lora_alpha,
                                lora_dropout=self.lora_dropout, lora_target_modules=self.lora_target_modules,
                                use_rslora=self.use_rslora, use_dora=self.use_dora)

    def peft_config(self) -> Any:
        """The peft ``LoraConfig`` of the policy (``trl.get_peft_config``), or None for full fine-tuning."""
        from trl import get_peft_config

        return get_peft_config(self.model_config())


def deprecation_note(old: str) -> str:
    new, why = ALIASES[old]
    return f"key '{old}' is deprecated, use '{new}' (the {why}); it still works"


def lora_config_for(rank: int, target_modules: list[str] | None = None, alpha: float | None = None) -> Any:
    """A peft ``LoraConfig`` of this rank (alpha defaults to the rank) through ``trl.get_peft_config``: the one
    LoRA path, for the policy's adapter and for auxiliary models' own adapters (DMD's fake score)."""
    from trl import get_peft_config

    return get_peft_config(model_config_for("", lora_r=rank, lora_alpha=alpha, lora_target_modules=target_modules))


def model_config_for(model: str, *, use_peft: bool = True, lora_r: int = 8, lora_alpha: float | None = None,
                     lora_dropout: float = 0.0, lora_target_modules: list[str] | None = None,
                     use_rslora: bool = False, use_dora: bool = False) -> Any:
    """A ``trl.ModelConfig`` for a video transformer: alpha defaults to the rank (scale 1); no task type (the
    adapter goes on a diffusers transformer through ``add_adapter``, not on a causal LM)."""
    from trl import ModelConfig

    targets = list(lora_target_modules or ["to_q", "to_k", "to_v", "to_out.0"])
    mc = ModelConfig(model_name_or_path=model, use_peft=use_peft, lora_r=lora_r,
                     lora_alpha=lora_alpha or lora_r,  # type: ignore[arg-type]  # peft accepts a float alpha
                     lora_dropout=lora_dropout, lora_target_modules=targets, use_rslora=use_rslora, use_dora=use_dora,
                     lora_task_type=None)  # type: ignore[arg-type]
    mc.lora_target_modules = targets  # ModelConfig turns a one-element list into a string; keep the list
    return mc


# ------------------------------------------------------------------------------------------------ validation
def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is Literal:  # membership is checked by ConfigBase.validate (the message lists the choices)
        return any(_type_ok(value, type(c)) for c in typing.get_args(tp))
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


def _pretty(tp: Any) -> str:
    choices = literal_choices(tp)
    if choices is not None:
        return "one of " + "|".join(str(c) for c in choices)
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def resolve_aliases(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """Map deprecated keys onto their new names (with a deprecation note); both given -> error."""
    if cls is not VideoRewardConfig:
        return dict(data)
    out = dict(data)
    for old, (new, _) in ALIASES.items():
        if old in out:
            if new in out:
                raise ConfigError(f"{where}: '{old}' and '{new}' are the same setting; keep only '{new}'", key=old)
            value = out.pop(old)
            hints = typing.get_type_hints(cls)
            if not _type_ok(value, hints[new]):
                raise ConfigError(f"{where}: key '{old}' must be {_pretty(hints[new])}, got "
                                  f"{type(value).__name__} {value!r}", key=old)
            warnings.warn(f"{where}: {deprecation_note(old)}", FutureWarning, stacklevel=2)
            out[new] = value
    return out


def check_fields(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """Unknown keys -> "did you mean"; wrong types name the key. Returns data with ints coerced to floats and
    deprecated keys renamed."""
    data = resolve_aliases(cls, data, where)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: unknown key '{key}'{hint}", key=key)
        tp = hints[key]
        if isinstance(value, str) and _accepts_float(tp):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if not _type_ok(value, tp):
            raise ConfigError(f"{where}: key '{key}' must be {_pretty(tp)}, got {type(value).__name__} {value!r}",
                              key=key)
        if tp is float and isinstance(value, int):
            value = float(value)
        out[key] = value
    return out


def config_from_dict(data: dict[str, Any], where: str = "recipe") -> VideoRewardConfig:
    """A ``VideoRewardConfig`` from a recipe mapping, parsed by ``trl.TrlParser`` (as ``trl-video train`` does)."""
    from .parsing import parse_train_args

    return parse_train_args([], recipe=data, where=where).config

"""``VideoRewardTrainer``: one generic RL / reward fine-tuning loop over the five hook points.

One step (see docs/architecture.md):
    prompts -> sampler -> reward -> estimator -> replay -> loss.phases(step): for each phase, for each repeat,
    for each micro-batch: loss.compute -> backward; then all-reduce grads across processes, clip, step
    that phase's optimiser groups -> EMA -> log -> checkpoint.
There is no method-specific branch here: methods express themselves through components, phases and the
auxiliary ``Trainable`` modules their loss returns from ``setup``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .components.base import Estimator, Loss, Phase, Replay, Sampler, Trainable, TrainContext
from .config import VideoRewardConfig
from .errors import TrlVideoError
from .plugins import Registry, get_registry
from .rollouts import Rollouts

CHECKPOINT_PREFIX = "checkpoint-"
PRECISION_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAINABLE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cast_trainable(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters that require grad (LoRA or the full transformer, auxiliary modules) to ``dtype``;
    frozen weights keep the dtype they were loaded in."""
    from diffusers.training_utils import cast_training_params

    cast_training_params(module, dtype=dtype)


def count_optimizer_steps(loss: Any, groups: list[str], config: VideoRewardConfig) -> tuple[dict[str, int],
                                                                                         dict[str, int]]:
    """Optimiser steps each group takes over the run, and during the first ``warmup_steps`` trainer steps,
    read from ``loss.phases(step)`` for every step (phase repeats, phases that run every M steps). A constant
    schedule needs no count."""
    total = dict.fromkeys(groups, config.max_steps)
    warm = dict.fromkeys(groups, config.warmup_steps)
    if config.lr_scheduler_type == "constant":
        return total, warm
    total = dict.fromkeys(groups, 0)
    warm = dict.fromkeys(groups, 0)
    for step in range(config.max_steps):
        for phase in loss.phases(step):
            for g in phase.groups:
                if g in total:
                    total[g] += phase.repeats
                    if step < config.warmup_steps:
                        warm[g] += phase.repeats
    return total, warm


class ForwardCounter:
    """Network function evaluations (NFE) of one module: every forward call adds its batch rows (a call on B
    samples is B NFE). Counts only inside :meth:`counting` (the training step, not evaluations run between steps),
    and separately inside :meth:`sampling` (rollouts). A deep copy of the module made later carries the hook."""

    def __init__(self, module: nn.Module) -> None:
        self.total = 0  # cumulative over the run (restored on resume)
        self.sampler = 0
        self._active = self._in_sampler = False
        module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._active:
            return
        x = kwargs.get("hidden_states", args[0] if args else None)
        n = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else 1
        self.total += n
        if self._in_sampler:
            self.sampler += n

    @contextlib.contextmanager
    def counting(self) -> Any:
        self._active = True
        try:
            yield
        finally:
            self._active = False

    @contextlib.contextmanager
    def sampling(self) -> Any:
        prev, self._in_sampler = self._in_sampler, True
        try:
            yield
        finally:
            self._in_sampler = prev


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA's max-allocated counter, or the process's peak RSS (Linux
    ``/proc/self/clear_refs``: writing 5 resets VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory_mb(device: torch.device) -> float:
    """Peak since :func:`reset_peak_memory`: CUDA max-allocated on GPU, peak RSS (VmHWM) on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # lifetime peak where /proc is missing


def flat_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A recipe as flat ``key.sub: scalar`` pairs (TensorBoard's hparams take only scalars and strings)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        elif isinstance(v, (bool, int, float, str)):
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def find_checkpoints(output_dir: str | Path) -> list[Path]:
    out = Path(output_dir)
    if not out.is_dir():
        return []
    cks = [p for p in out.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
           and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "trainer_state.json").exists()]
    return sorted(cks, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


class VideoRewardTrainer:
    """Reward fine-tuning / RL trainer for video diffusion and flow-matching models.

    Args:
        config: the training configuration.
        policy: an already loaded :class:`~trl_video.models.policy.VideoPolicy` (default: load ``config.model``).
        registry: component registry (default: installed plugins).
        callbacks: ``transformers.TrainerCallback`` instances (or any object with some of the event methods),
            dispatched by transformers' ``CallbackHandler`` (:mod:`trl_video.callbacks`): ``on_train_begin``,
            ``on_step_begin``, ``on_rollout`` (the step's rollouts after reward and estimator), ``on_step_end``,
            ``on_log``, ``on_save``, ``on_train_end``; setting ``control.should_training_stop`` stops training.
        recipe: the raw recipe mapping (written into checkpoints and the model card).
    """

    def __init__(self, config: VideoRewardConfig, policy: Any = None, registry: Registry | None = None,
                 callbacks: list[Any] | None = None, recipe: dict[str, Any] | None = None,
                 resume: bool | str | Path = False, accept_recipe_changes: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from .plan import build_reward, resolve_plan

        self.config = config
        self.recipe = recipe if recipe is not None else config.to_dict()
        self.registry = registry or get_registry()
        self.plan = resolve_plan(config, self.registry)
        self.output_dir = Path(config.output_dir)
        config.check_trackers_installed()
        from accelerate.utils import ProjectConfiguration

        # The trainer applies the recipe's precision itself (dtypes, autocast, GradScaler for fp16): accelerate's
        # state is a process-wide singleton that cannot change between trainers, and it has no fp16 on CPU.
        # Trackers through accelerate (report_to): TensorBoard events go to output_dir/tensorboard/<run name>.
        self.accelerator = Accelerator(mixed_precision="no", log_with=config.trackers or None,
                                       project_config=ProjectConfiguration(
                                           project_dir=str(self.output_dir),
                                           logging_dir=str(self.output_dir / "tensorboard")))
        from .validation import validate_config

        validate_config(config, self.plan, self.registry, check_model=policy is None)
        from .checkpointing import all_checkpoints, select_resume_checkpoint

        existing = all_checkpoints(self.output_dir)
        if existing and not resume:
            raise TrlVideoError(f"output dir '{self.output_dir}' already holds {existing[-1].name}: pass --resume to "
                                f"continue it, or choose another --output-dir (nothing was changed)")
        if not resume and (self.output_dir / "metrics.jsonl").exists():
            # a run stopped before its first checkpoint: a new run there would log its steps a second time
            raise TrlVideoError(f"output dir '{self.output_dir}' already holds metrics.jsonl of an earlier run (no "
                                f"checkpoint to resume from): choose another --output-dir, or delete the folder "
                                f"(nothing was changed)")
        # verified (manifest) before any weights load; a damaged latest checkpoint names the newest intact one
        self.resume_from = (select_resume_checkpoint(self.output_dir, None if resume is True else resume)
                            if resume else None)
        self.accept_recipe_changes = accept_recipe_changes
        self._accepted: set[str] = set()  # top-level keys of the unsafe recipe changes a resume accepted
        self.interrupted: int | None = None
        self._row_notes: dict[str, Any] = {}
        set_seed(config.seed)

        # ---- model: frozen weights in the recipe's dtype, trainable parameters in trainable_dtype (fp32 masters)
        self.frozen_dtype = PRECISION_DTYPES[config.mixed_precision]
        self.trainable_dtype = TRAINABLE_DTYPES[config.trainable_dtype]
        if policy is None:
            from .models.policy import load_policy

            policy = load_policy(config.model, dtype=self.frozen_dtype, num_frames=config.num_frames,
                                 height=config.height, width=config.width)
        if self.plan.method.prepare_policy is not None:  # the method adapts the model (before LoRA / reference)
            self.plan.method.prepare_policy(policy, self.plan.method_config)
        self.policy = policy.to(self.accelerator.device)  # a policy passed in is used in the dtype it has
        self.policy.configure_text_cache(config.text_cache_size, config.prompt_embeds)
        torch.manual_seed(config.seed)
        peft_config = config.peft_config()  # trl.get_peft_config(trl.ModelConfig) -> peft LoraConfig | None
        if peft_config is not None:
            if not self.policy.uses_lora:
                self.policy.add_adapter(peft_config)
        else:
            self.policy.transformer.requires_grad_(True)
            self.policy.freeze_reference()  # the frozen copy keeps the frozen dtype
        cast_trainable(self.policy.transformer, self.trainable_dtype)
        # fp16: dynamic loss scaling; overflowing steps are skipped and counted
        self.scaler: torch.amp.GradScaler | None = None
        if config.mixed_precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.accelerator.device.type)
        if config.gradient_checkpointing and hasattr(self.policy.transformer, "enable_gradient_checkpointing"):
            self.policy.transformer.enable_gradient_checkpointing()

        # ---- components
        comps = self.plan.components
        self.reward = build_reward(self.registry, *comps["reward"])
        # create() checks each against its interface (components.base) and fills undeclared flags
        self.sampler: Sampler = self.registry.create("sampler", comps["sampler"][0], **comps["sampler"][1])
        self.estimator: Estimator = self.registry.create("estimator", comps["estimator"][0], **comps["estimator"][1])
        self.replay: Replay = self.registry.create("replay", comps["replay"][0], **comps["replay"][1])
        self.loss: Loss = self.registry.create("loss", comps["loss"][0], **comps["loss"][1])
        rank = self.accelerator.process_index
        registry = self.registry
        self.ctx = TrainContext(policy=self.policy, config=config, accelerator=self.accelerator, reward=self.reward,
                                method_config=self.plan.method_config,
                                generator=torch.Generator().manual_seed(config.seed * 1000 + 12345 + rank),
                                registry=self.registry, sampler=self.sampler,
                                make_reward=lambda name, args: build_reward(registry, name, args))
        if config.offline_latents:
            from .data import OfflineLatents

            self.ctx.offline = OfflineLatents(config.offline_latents, self.policy.latent_shape, seed=config.seed)
        if self.replay.needs_rollouts:
            from .data import PromptSampler, load_prompts

            self.prompt_sampler: Any = PromptSampler(load_prompts(config.prompt_datasets or config.prompts,
                                                                        config.prompt_column), config.seed)
        else:
            self.prompt_sampler = None
        _ = config.per_process_batch  # validates divisibility early

        # ---- trainable groups: the policy + whatever the loss trains
        aux: dict[str, Trainable] = self.loss.setup(self.ctx) or {}
        self.groups: dict[str, Trainable] = {}
        if self.policy.trainable_parameters():
            self.groups["policy"] = Trainable(self.policy.transformer, ema_decay=config.ema_decay or None)
        for name, tr in aux.items():
            if name in self.groups:
                raise TrlVideoError(f"loss '{comps['loss'][0]}' declares a trainable group named '{name}' twice")
            tr.module.to(self.accelerator.device)
            cast_trainable(tr.module, self.trainable_dtype)
            self.groups[name] = tr
        self.ctx.modules = {n: g.module for n, g in self.groups.items()}
        self.sharding = self._shard({n: g.module for n, g in aux.items()})
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        from transformers import get_scheduler

        # each group's schedule spans the optimiser steps it really takes (phase repeats, every-M phases)
        self.planned_steps, planned_warmup = count_optimizer_steps(self.loss, list(self.groups), config)
        for name, g in self.groups.items():
            params = self.group_params(name)
            opt = torch.optim.AdamW(params, lr=g.lr or config.learning_rate,
                                    weight_decay=config.weight_decay if g.weight_decay is None else g.weight_decay,
                                    betas=g.betas or (config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
            self.optimizers[name] = opt
            self.schedulers[name] = get_scheduler(config.lr_scheduler_type, opt,
                                                  num_warmup_steps=planned_warmup[name],
                                                  num_training_steps=max(1, self.planned_steps[name]))
        # this recipe's optimiser hyperparameters (lr = the schedule's base): a resumed run re-applies them over the
        # restored optimiser/scheduler state, so an accepted change (learning_rate, betas, warmup, ...) takes effect
        self._recipe_hparams = {n: [{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]
                                for n, o in self.optimizers.items()}
        # EMA copies (diffusers' EMAModel) of every group that asks for one: a decay, or the loss's schedule
        from .ema import make_ema

        for name, g in self.groups.items():
            ema = make_ema(self.group_params(name), g.ema_decay, self.loss.ema_schedule(name))
            if ema is not None:
                self.ctx.ema[name] = ema
        from transformers import TrainerControl, TrainerState

        from .callbacks import VideoCallbackHandler

        self.callback_handler = VideoCallbackHandler(list(callbacks or []), self.policy.transformer,
                                                     self.optimizers.get("policy"), self.schedulers.get("policy"))
        self.global_step = 0
        self.state = TrainerState(max_steps=config.max_steps, logging_steps=config.logging_steps,
                                  save_steps=config.save_steps, train_batch_size=config.global_batch,
                                  is_local_process_zero=self.accelerator.is_local_main_process,
                                  is_world_process_zero=self.is_main, log_history=[])
        self.control = TrainerControl()
        self.history: list[dict[str, Any]] = self.state.log_history
        self._trackers_started = False
        self._score_worker: Any = None  # score_async: the scoring thread (created on first use)
        self._prefetched: Rollouts | None = None  # score_async: the next batch, sampled while this one was scored
        # compute accounting, logged cumulatively (``nfe``, ``nfe_sampler``, ``samples_generated``): the policy
        # transformer's forwards during training steps, whatever the method
        self.nfe = ForwardCounter(self.policy.transformer)
        # and the forwards of the loss's auxiliary trainables (a fake score, a reward-model ensemble, a baseline
        # net), logged summed as ``nfe_aux``: a method's compute is not only its policy calls
        self.nfe_aux = [ForwardCounter(g.module) for g in aux.values()]
        self.samples_generated = 0

    # ------------------------------------------------------------------ helpers
    def group_module(self, name: str) -> nn.Module:
        """The module that owns a trainable group's parameters."""
        return self.policy.transformer if name == "policy" else self.groups[name].module

    def group_params(self, name: str) -> list[nn.Parameter]:
        if name == "policy":
            return self.policy.trainable_parameters()
        return [p for p in self.groups[name].module.parameters() if p.requires_grad]

    @property
    def callbacks(self) -> list[Any]:
        return self.callback_handler.callbacks

    def add_callback(self, callback: Any) -> None:
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback: Any) -> Any:
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback: Any) -> None:
        self.callback_handler.remove_callback(callback)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _shard(self, aux: dict[str, nn.Module]) -> Any:
        """FSDP2 (``fsdp: true`` or an accelerate FSDP config): shard the transformer, its frozen reference and
        block-structured auxiliary models before any optimiser or EMA sees their parameters."""
        from . import sharding

        if not sharding.fsdp_requested(self.config):
            return None
        options = sharding.fsdp_options(self.config)
        if self.config.eval_at_end:
            raise TrlVideoError("fsdp: eval_at_end is not supported on a sharded run; evaluate the exported model "
                                "with `trl-video eval --checkpoint <output_dir>` after training")
        if self.accelerator.num_processes == 1:
            world = int(os.environ.get("WORLD_SIZE", "1") or 1)
            if world > 1:  # accelerate on CPU with an FSDP launcher config: every rank thinks it is rank 0
                raise TrlVideoError(f"fsdp: {world} processes were launched but accelerate sees 1 "
                                    f"(distributed type {self.accelerator.distributed_type}); on CPU launch with "
                                    f"`torchrun --nproc_per_node N` and ACCELERATE_USE_CPU=true, `fsdp: true` in "
                                    f"the recipe (see README, Sharding)")
            return None  # one process holds everything: sharding would only add copies
        return sharding.shard_for_training(self.policy, aux, self.accelerator.device.type,
                                           self.accelerator.num_processes, options)

    def autocast(self) -> Any:
        """Autocast for forward passes in the recipe's mixed-precision dtype."""
        if self.config.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.accelerator.device.type, dtype=self.frozen_dtype)

    def _backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(self.scaler.scale(loss) if self.scaler is not None else loss)

    def _sync_gradients(self, params: list[nn.Parameter]) -> None:
        """Average gradients across ranks in place (bounded buckets, no flat copy; FSDP2-sharded parameters
        are skipped). Explicit rather than DDP hooks: methods call one network several times per backward
        (policy/reference/fake, two noising batches)."""
        if self.accelerator.num_processes > 1:
            from .grad_sync import all_reduce_gradients

            all_reduce_gradients(params, bucket_bytes=int(self.config.grad_sync_bucket_mb * 2**20))

    def _sync_and_step(self, name: str) -> tuple[float, bool]:
        """All-reduce, unscale (fp16), clip and step one group. Returns (grad norm before clipping, unscaled;
        whether the step was skipped because the fp16 gradients overflowed)."""
        params = self.group_params(name)
        self._sync_gradients(params)
        g, opt = self.groups[name], self.optimizers[name]
        has_grad = any(p.grad is not None for p in params)
        scaler = self.scaler if has_grad else None
        if scaler is not None:
            scaler.unscale_(opt)
        max_norm = g.max_grad_norm if g.max_grad_norm is not None else self.config.max_grad_norm
        if has_grad and max_norm and max_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        elif has_grad:
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        else:
            norm = 0.0
        skipped = False
        if scaler is not None:
            scaler.step(opt)  # skips the update when unscale_ found inf/nan
            skipped = not np.isfinite(norm)
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if not skipped:
            sch = self.schedulers[name]
            if sch.last_epoch < self.planned_steps[name]:  # never run past the planned schedule
                sch.step()
            if name in self.ctx.ema:
                self.ctx.ema[name].step(params)
        return norm, skipped

    def _sample_batch(self, sample_grad: bool) -> Rollouts:
        """Draw this step's prompts (this rank's share) and sample them."""
        cfg, ctx = self.config, self.ctx
        prompts_u, _ = self.prompt_sampler.next(cfg.prompts_per_step)
        prompts = [p for p in prompts_u for _ in range(cfg.group_size)]
        gids = torch.arange(cfg.prompts_per_step).repeat_interleave(cfg.group_size)
        n, rank = cfg.per_process_batch, self.accelerator.process_index
        prompts, gids = prompts[rank * n:(rank + 1) * n], gids[rank * n:(rank + 1) * n].to(ctx.device)
        with self.nfe.sampling():
            return self._sample_prompts(prompts, gids, sample_grad)

    def _sample_prompts(self, prompts: list[str], gids: torch.Tensor, sample_grad: bool) -> Rollouts:
        embeds, _ = self.policy.encode_prompts(prompts)
        with torch.set_grad_enabled(sample_grad):
            fresh = self.sampler.sample(self.ctx, prompts, embeds, gids)
        fresh.prompts = list(prompts)
        return fresh

    def _fresh_rollouts(self, prefetch_next: bool = True) -> Rollouts:
        ctx = self.ctx
        sample_grad = self.loss.sample_grad
        reward_grad = sample_grad and self.loss.reward_grad
        if not self.config.score_async or sample_grad:
            fresh = self._sample_batch(sample_grad)
            fresh.rewards = ctx.score(fresh.latents, fresh.prompts, grad=reward_grad)
            return self._estimate(fresh)
        # score_async: this batch is scored in a worker thread while the next one is sampled
        fresh = self._prefetched if self._prefetched is not None else self._sample_batch(False)
        self._prefetched = None
        if self._score_worker is None:
            from concurrent.futures import ThreadPoolExecutor

            self._score_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trl-video-score")
        pending = self._score_worker.submit(ctx.score, fresh.latents, fresh.prompts)
        try:
            if prefetch_next:
                self._prefetched = self._sample_batch(False)
        finally:
            fresh.rewards = pending.result()  # a reward error is raised here, in the main thread
        return self._estimate(fresh)

    def _estimate(self, fresh: Rollouts) -> Rollouts:
        batch = self.estimator(self.ctx, fresh)
        self.control = self.callback_handler.on_rollout(self.config, self.state, self.control, rollouts=batch,
                                                        trainer=self)
        return batch

    def _batch(self, cache: dict[Any, Rollouts], m: int, stats: dict[str, list[torch.Tensor]],
               uses_graph: bool = True) -> Rollouts:
        """Micro-batch ``m`` of this step, sampled once. The sampling graph (if any) goes to the first phase
        that uses it; every other request gets the detached copy."""
        if m in cache:
            graph = cache.pop(("graph", m), None) if uses_graph else None
            return graph if graph is not None else cache[m]
        fresh = None
        if self.replay.needs_rollouts:
            last = self.global_step + 1 >= self.config.max_steps and m == self.config.gradient_accumulation_steps - 1
            fresh = self._fresh_rollouts(prefetch_next=not last)
            assert fresh.rewards is not None
            stats["reward"].append(fresh.rewards.detach())
            self.samples_generated += len(fresh.rewards)
            self.replay.update(self.ctx, fresh)
        batch = self.replay.sample(self.ctx, fresh)
        if fresh is None and batch.rewards is not None:
            stats["reward"].append(batch.rewards.detach())
        cache[m] = batch.detach()
        if not uses_graph:
            cache[("graph", m)] = batch
            return cache[m]
        return batch

    # ------------------------------------------------------------------ one step
    def training_step(self) -> dict[str, float]:
        cfg, ctx = self.config, self.ctx
        ctx.step = self.global_step
        ctx.state.clear()
        reset_peak_memory(self.accelerator.device)
        t0 = time.perf_counter()
        cache: dict[Any, Rollouts] = {}
        stats: dict[str, list[torch.Tensor]] = {"reward": []}
        values: dict[str, list[float]] = {}  # every micro-batch / repeat value; logged: mean over them and ranks
        skipped: dict[str, int] = {}
        phases: list[Phase] = self.loss.phases(self.global_step)
        accum = cfg.gradient_accumulation_steps
        with contextlib.ExitStack() as counting:
            for counter in (self.nfe, *self.nfe_aux):
                counting.enter_context(counter.counting())
            for phase in phases:
                unknown = [g for g in phase.groups if g not in self.groups]
                if unknown:
                    raise TrlVideoError(f"loss phase '{phase.name}' steps unknown groups {unknown}; "
                                        f"trainable groups: {list(self.groups)}")
                for _ in range(phase.repeats):
                    for m in range(accum):
                        with self.autocast():
                            batch = self._batch(cache, m, stats, phase.uses_graph) if phase.needs_rollouts else None
                            loss, met = self.loss.compute(ctx, phase, batch)
                        if not torch.isfinite(loss):
                            raise TrlVideoError(f"loss phase '{phase.name}' is not finite ({float(loss)}) at step "
                                                f"{self.global_step}")
                        if loss.requires_grad:
                            self._backward(loss / accum)
                        values.setdefault(f"loss/{phase.name}", []).append(float(loss.detach()))
                        for k, v in met.items():
                            values.setdefault(f"{phase.name}/{k}", []).append(float(v))
                    for g in phase.groups:
                        norm, was_skipped = self._sync_and_step(g)
                        if was_skipped:
                            skipped[g] = skipped.get(g, 0) + 1
                        else:
                            values.setdefault(f"grad_norm/{g}", []).append(norm)
                    if self.scaler is not None and phase.groups:
                        self.scaler.update()  # once per backward, after every optimiser it fed has stepped
        seconds = time.perf_counter() - t0
        metrics = self._reduce_metrics(values, stats, seconds)
        for g, n in skipped.items():
            metrics[f"skipped_steps/{g}"] = float(n)
        if self.scaler is not None:
            metrics["loss_scale"] = float(self.scaler.get_scale())
        reward_metrics = getattr(self.reward, "pop_metrics", None)  # e.g. each component of a reward mix
        if reward_metrics is not None:
            metrics.update({f"reward/{k}": float(v) for k, v in reward_metrics().items()})
        for name, sch in self.schedulers.items():
            metrics[f"lr/{name}"] = float(sch.get_last_lr()[0])
        return metrics

    def _reduce_metrics(self, values: dict[str, list[float]], stats: dict[str, list[torch.Tensor]],
                        seconds: float) -> dict[str, float]:
        """Means over micro-batches / repeats and over ranks (one collective); rewards over every sample of
        every rank; samples per second; the step's peak memory (max over ranks)."""
        keys = sorted(values)
        local = [float(np.mean(values[k])) for k in keys]
        rewards = torch.cat(stats["reward"]).float() if stats["reward"] else None
        n_samples = 0 if rewards is None else len(rewards)
        peak = peak_memory_mb(self.accelerator.device)
        counts = [float(self.nfe.total), float(self.nfe.sampler), float(self.samples_generated),
                  float(sum(c.total for c in self.nfe_aux))]
        row = torch.tensor([*local, float(n_samples), *counts, seconds, peak], dtype=torch.float64)
        if self.accelerator.num_processes > 1:
            rows = self.accelerator.gather(row.to(self.accelerator.device).unsqueeze(0)).cpu()
            if rewards is not None:
                rewards = self.ctx.gather(rewards)
            means, total_samples = rows[:, :len(keys)].mean(0), float(rows[:, len(keys)].sum())
            counts = rows[:, len(keys) + 1:len(keys) + 5].sum(0).tolist()  # cumulative per rank -> whole run
            seconds, peak = float(rows[:, -2].max()), float(rows[:, -1].max())
        else:
            means, total_samples = row[:len(keys)], float(n_samples)
        metrics = {k: float(v) for k, v in zip(keys, means.tolist())}
        if rewards is not None:
            metrics["reward_mean"] = float(rewards.mean())
            metrics["reward_std"] = float(rewards.std(unbiased=False))
            metrics["samples_per_second"] = total_samples / seconds
        metrics["seconds"] = seconds
        metrics["peak_memory_mb"] = peak
        metrics["nfe"], metrics["nfe_sampler"], metrics["samples_generated"], metrics["nfe_aux"] = counts
        return metrics

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        """Train to ``max_steps`` under the output dir's lock. A SIGTERM/SIGINT finishes the step, writes a
        checkpoint and returns early (``result["interrupted"]`` = the signal number)."""
        from .runguard import OutputLock, StopSignals

        with OutputLock(self.output_dir, enabled=self.is_main), StopSignals() as self._stop:
            return self._train()

    def _train(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.config
        if self.resume_from is not None:
            self._prepare_resume(self.resume_from)
            self.load_checkpoint(self.resume_from, verified=True)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if cfg.trackers and not self._trackers_started:
            # resumed: TensorBoard hides the interrupted run's events from the first step this run logs again
            # (SummaryWriter's purge_step), as metrics.jsonl drops its rows
            init_kwargs = {"tensorboard": {"purge_step": self.global_step + 1}} if self.resume_from else {}
            self.accelerator.init_trackers(self.output_dir.resolve().name,
                                           config=flat_config(self.written_recipe()["recipe"]),
                                           init_kwargs=init_kwargs)
            self._trackers_started = True
        state = self.state
        state.global_step = self.global_step
        self._call("on_train_begin", state, self.control)
        bar = tqdm(total=cfg.max_steps, initial=self.global_step, disable=not self.is_main, desc="train",
                   dynamic_ncols=True)
        try:
            while self.global_step < cfg.max_steps:
                self._call("on_step_begin", state, self.control)
                metrics = self.training_step()
                self.global_step += 1
                state.global_step = self.global_step
                if self.global_step % cfg.logging_steps == 0 or self.global_step == cfg.max_steps:
                    self.log(metrics)
                    self._call("on_log", state, self.control, logs=dict(metrics))
                bar.update(1)
                if "reward_mean" in metrics:
                    bar.set_postfix(reward=f"{metrics['reward_mean']:.4f}")
                self._call("on_step_end", state, self.control, metrics=metrics)
                if cfg.save_steps and self.global_step % cfg.save_steps == 0 and self.global_step < cfg.max_steps:
                    self.save_checkpoint()
                    self._call("on_save", state, self.control)
                if self.control.should_training_stop:
                    break
                self.interrupted = self._stop.requested(self.accelerator)
                if self.interrupted:
                    break
        finally:
            bar.close()
            if self._score_worker is not None:
                self._score_worker.shutdown(wait=True, cancel_futures=True)
                self._score_worker = None
        self.save_checkpoint()
        if self.interrupted:
            self.accelerator.wait_for_everyone()
            return {"global_step": self.global_step, "output_dir": str(self.output_dir),
                    "interrupted": self.interrupted}
        if cfg.save_model_at_end:
            self.save_model()
        self._call("on_train_end", state, self.control)
        result: dict[str, Any] = {"global_step": self.global_step, "output_dir": str(self.output_dir)}
        if cfg.eval_at_end:
            from .evaluation import evaluate_trainer

            with self.autocast():  # frozen weights may be bf16/fp16
                result["eval"] = evaluate_trainer(self)
            if result["eval"] and self._trackers_started:
                ev = result["eval"]
                self.accelerator.log({f"eval/{ev['reward']}_{k}": float(ev[k]) for k in
                                      ("reward_before", "reward_after", "gain", "gain_sem")}, step=self.global_step)
        if self._trackers_started:
            self.accelerator.end_training()  # flushes and closes every tracker
            self._trackers_started = False
        if cfg.push_to_hub and self.is_main:
            result["hub_url"] = self.push_to_hub()
        self.accelerator.wait_for_everyone()
        return result

    def _call(self, event: str, state: Any, control: Any, **kw: Any) -> None:
        self.control = getattr(self.callback_handler, event)(self.config, state, control, trainer=self, **kw)

    def log(self, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        row = {"step": self.global_step, **{k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}}
        row.update(self._row_notes)  # resume notes (accepted recipe changes) ride on the first row after resume
        self._row_notes = {}
        self.history.append(row)  # = state.log_history
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._trackers_started:
            self.accelerator.log(metrics, step=self.global_step)

    # ------------------------------------------------------------------ checkpoints
    def _component_states(self) -> dict[str, Any]:
        states: dict[str, Any] = {}
        for kind in ("replay", "estimator", "loss", "sampler", "reward"):
            comp = getattr(self, kind)
            if hasattr(comp, "state_dict"):
                states[kind] = comp.state_dict()
        if self.prompt_sampler is not None:
            states["prompt_sampler"] = self.prompt_sampler.state_dict()
        if self.ctx.offline is not None:
            states["offline"] = self.ctx.offline.state_dict()
        if self._prefetched is not None:  # score_async: resuming continues with the same next batch
            states["prefetched"] = self._prefetched.detach().to("cpu").as_dict()
        return states

    def save_checkpoint(self) -> Path:
        """Atomic: everything is written to a temporary folder that is renamed into place at the end."""
        from safetensors.torch import save_file

        final = self.output_dir / f"{CHECKPOINT_PREFIX}{self.global_step}"
        tmp = self.output_dir / f".tmp-{CHECKPOINT_PREFIX}{self.global_step}"
        rank = self.accelerator.process_index
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        torch.save(self._rng_state(), tmp / f"rng-{rank}.pt")
        # full (unsharded) states, gathered on every rank when FSDP shards the modules: one format for all runs
        from . import sharding

        groups = {name: sharding.full_state_dict(self.group_module(name), trainable_only=name == "policy")
                  for name in self.groups}
        optimizers = {n: {"optimizer": sharding.optimizer_state_dict(self.group_module(n), o),
                          "scheduler": self.schedulers[n].state_dict()} for n, o in self.optimizers.items()}
        emas = {n: sharding.ema_state_dict(e) for n, e in self.ctx.ema.items()}
        self.accelerator.wait_for_everyone()  # all ranks' RNG files are in tmp before it is renamed into place
        if self.is_main:
            tensors = {f"{name}/{n}": t for name, part in groups.items() for n, t in part.items()}
            save_file(tensors, str(tmp / "trainable.safetensors"))
            torch.save(optimizers, tmp / "optimizers.pt")
            torch.save(emas, tmp / "ema.pt")
            if self.scaler is not None:  # fp16: the loss scale and its growth tracker resume too
                torch.save(self.scaler.state_dict(), tmp / "scaler.pt")
            torch.save(self._component_states(), tmp / "components.pt")
            if self.policy.uses_lora:
                from peft.utils import get_peft_model_state_dict

                lora = get_peft_model_state_dict(self.policy.transformer, state_dict=groups["policy"])
                self.policy.pipeline().__class__.save_lora_weights(tmp, transformer_lora_layers=lora,
                                                                   safe_serialization=True)
            (tmp / "trainer_state.json").write_text(json.dumps(
                {"global_step": self.global_step, **self.written_recipe(), "data": self._data_fingerprint(),
                 "counts": {"nfe": self.nfe.total, "nfe_sampler": self.nfe.sampler,
                            "samples_generated": self.samples_generated,
                            "nfe_aux": [c.total for c in self.nfe_aux]}},
                indent=2, default=str))
            from .checkpointing import write_manifest

            write_manifest(tmp)  # last: sizes, hashes, tensor shapes of everything above
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._rotate_checkpoints()
        self.accelerator.wait_for_everyone()
        return final

    def written_recipe(self) -> dict[str, Any]:
        """Config and recipe as written to disk (checkpoints, model card): secrets masked."""
        from .recipe_io import env_refs, redact

        secrets = env_refs(self.recipe)
        return {"config": redact(self.config.to_dict(), secrets), "recipe": redact(self.recipe, secrets)}

    def _data_fingerprint(self) -> dict[str, Any]:
        from .checkpointing import data_fingerprint

        prompts = self.prompt_sampler.prompts if self.prompt_sampler is not None else None
        fp = data_fingerprint(prompts)
        if self.ctx.offline is not None:
            fp["offline_rows"] = len(self.ctx.offline)
        return fp

    def _prepare_resume(self, path: Path) -> None:
        """Compare the checkpoint's recipe and data with this run's; drop metrics rows logged after it."""
        from .checkpointing import compare_recipes, truncate_metrics, unacceptable_changes

        state = json.loads((path / "trainer_state.json").read_text())
        safe, unsafe = compare_recipes(state.get("config", {}), self.written_recipe()["config"])
        saved_data, data = state.get("data", {}), self._data_fingerprint()
        unsafe += [f"data.{k}" for k in sorted(set(saved_data) | set(data)) if saved_data.get(k) != data.get(k)]
        fixed = unacceptable_changes(unsafe)
        if fixed:
            raise TrlVideoError(f"cannot resume '{path}': the recipe differs in {', '.join(unsafe)}, and a resumed run "
                                f"cannot take {', '.join(fixed)} (the checkpoint's state fixes them); restore them, or "
                                f"start a new run in another --output-dir (nothing was changed)")
        if unsafe and not self.accept_recipe_changes:
            raise TrlVideoError(f"cannot resume '{path}': the recipe differs in {', '.join(unsafe)}; restore them, or "
                                f"pass --accept-recipe-changes to continue with the new values (nothing was changed)")
        self._accepted = {k.split(".")[0] for k in unsafe}
        if self.is_main:
            for key, (old, new) in safe.items():
                print(f"resume: {key} {old} -> {new}")
            if unsafe:
                print(f"resume: accepted recipe changes in {', '.join(unsafe)} (--accept-recipe-changes)")
            step = int(state["global_step"])
            dropped = truncate_metrics(self.output_dir / "metrics.jsonl", step)
            if dropped:
                print(f"resume: dropped {dropped} metrics rows logged after step {step} (they are recomputed)")
        self._row_notes = {"resumed_from_step": int(state["global_step"])}
        if unsafe:
            self._row_notes["accepted_recipe_changes"] = ",".join(unsafe)
        if safe:
            self._row_notes["safe_recipe_changes"] = ",".join(safe)

    def _rotate_checkpoints(self) -> None:
        limit = self.config.save_total_limit
        if not limit:
            return
        for old in find_checkpoints(self.output_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def _rng_state(self) -> dict[str, Any]:
        np_state: Any = np.random.get_state()
        return {"torch": torch.get_rng_state(), "generator": self.ctx.generator.get_state(),
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
                "python": json.dumps(random.getstate())}

    def load_checkpoint(self, path: str | Path, verified: bool = False) -> None:
        from safetensors.torch import load_file

        from .checkpointing import check_tensors, verify_checkpoint

        path = Path(path)
        if not (path / "trainer_state.json").exists():
            raise TrlVideoError(f"'{path}' is not a trl-video checkpoint (no trainer_state.json)")
        problem = None if verified else verify_checkpoint(path)
        if problem:
            raise TrlVideoError(f"checkpoint '{path}' is damaged: {problem}")
        state = json.loads((path / "trainer_state.json").read_text())
        from . import sharding

        tensors = load_file(str(path / "trainable.safetensors"))
        for name in self.groups:
            prefix = f"{name}/"
            part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if name == "policy":
                params = dict(self.policy.transformer.named_parameters())
                check_tensors(path, part, {n: p for n, p in params.items() if p.requires_grad}, name)
            else:
                check_tensors(path, part, self.group_module(name).state_dict(), name)
            # sharded or not, every rank loads the full tensors; FSDP keeps its own shard of each
            sharding.load_full_state_dict(self.group_module(name), part, strict=name != "policy")
        opt_states = torch.load(path / "optimizers.pt", weights_only=True)
        for n, s in opt_states.items():
            sharding.load_optimizer_state_dict(self.group_module(n), self.optimizers[n], s["optimizer"])
            self.schedulers[n].load_state_dict(s["scheduler"])
        for n, s in torch.load(path / "ema.pt", weights_only=True).items():
            if n in self.ctx.ema:  # an accepted ema_decay 0 drops the EMA
                sharding.load_ema_state_dict(self.ctx.ema[n], s)
        self._apply_recipe_over_restored_state()
        if self.scaler is not None and (path / "scaler.pt").exists():
            self.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
        comps = torch.load(path / "components.pt", weights_only=True)
        if self._accepted & {"reward", "reward_args"}:
            comps.pop("reward", None)  # the old reward's statistics do not describe the new reward
        for kind in ("replay", "estimator", "loss", "sampler", "reward"):
            if kind in comps and hasattr(getattr(self, kind), "load_state_dict"):
                getattr(self, kind).load_state_dict(comps[kind])
        if "prompt_sampler" in comps and self.prompt_sampler is not None:
            self.prompt_sampler.load_state_dict(comps["prompt_sampler"])
            if self._accepted & {"data", "prompts", "prompt_datasets", "prompt_column"}:
                self.prompt_sampler.order = []  # the saved epoch indexes the old list: a new epoch over the new one
        if "offline" in comps and self.ctx.offline is not None:
            self.ctx.offline.load_state_dict(comps["offline"])
        if "prefetched" in comps and not self._accepted:  # sampled under the old recipe: sampled again
            self._prefetched = Rollouts(**comps["prefetched"]).to(self.ctx.device)
        rank = self.accelerator.process_index
        rng = torch.load(path / f"rng-{rank}.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        self.ctx.generator.set_state(rng["generator"])
        np_s = rng["numpy"]
        np.random.set_state((np_s[0], np_s[1].numpy().astype(np.uint32), *np_s[2:]))
        py = json.loads(rng["python"])
        random.setstate((py[0], tuple(py[1]), py[2]))
        self.global_step = int(state["global_step"])
        counts = state.get("counts", {})
        self.nfe.total, self.nfe.sampler = int(counts.get("nfe", 0)), int(counts.get("nfe_sampler", 0))
        self.samples_generated = int(counts.get("samples_generated", 0))
        for counter, total in zip(self.nfe_aux, counts.get("nfe_aux", [])):
            counter.total = int(total)

    def _apply_recipe_over_restored_state(self) -> None:
        """After a checkpoint's optimiser/scheduler/EMA states are loaded, put this recipe's hyperparameters back:
        AdamW's betas/eps/weight decay, each group's base LR (``initial_lr``, the scheduler's ``base_lrs``) and its
        current LR on this recipe's schedule at the restored position, and the EMA decay. Unchanged recipes get
        the restored values back bit for bit (the same ``base * lambda(step)`` the scheduler computed); accepted
        changes take effect from the next step."""
        from torch.optim.lr_scheduler import LambdaLR

        for name, opt in self.optimizers.items():
            sch = self.schedulers[name]
            for i, (group, fresh) in enumerate(zip(opt.param_groups, self._recipe_hparams[name])):
                old_base = sch.base_lrs[i]
                group.update({k: v for k, v in fresh.items() if k != "lr"})
                base = sch.base_lrs[i] = fresh["initial_lr"]
                if isinstance(sch, LambdaLR):  # every transformers schedule validation admits
                    group["lr"] = base * sch.lr_lambdas[i](sch.last_epoch)
                else:
                    group["lr"] = group["lr"] * base / old_base
            sch._last_lr = [g["lr"] for g in opt.param_groups]
        # the recipe's EMA decay (diffusers' load_state_dict restores the saved one; a loss's ScheduledEMA ignores
        # it); an EMA new to the run needs nothing more: diffusers' first update copies the weights
        for name, ema in self.ctx.ema.items():
            decay = self.groups[name].ema_decay
            if decay:
                ema.decay = decay

    # ------------------------------------------------------------------ export
    def save_model(self, path: str | Path | None = None) -> Path:
        """Write a diffusers pipeline folder (LoRA merged + the adapter file) with a model card, atomically."""
        path = Path(path) if path else self.output_dir / "model"
        transformer = None
        if self.sharding is not None:  # a plain copy of the gathered weights (and adapter) on rank 0
            from .sharding import unsharded_copy

            transformer = unsharded_copy(self.policy.transformer, self.is_main)
        if self.is_main:
            tmp = path.with_name(f".tmp-{path.name}")
            if tmp.exists():
                shutil.rmtree(tmp)
            config = self.written_recipe()["config"]
            # "run": what `trl-video eval` needs to sample this model as the run's method does (EvalSampling)
            run = {k: config[k] for k in ("method", "method_args", "sampler", "sampler_args")}
            self.policy.save_pretrained(tmp, transformer=transformer, extra_meta={
                "base_model": self.config.model, "method": self.config.method, "reward": self.config.reward,
                "steps": self.global_step, "run": run})
            from .hub import write_model_card

            write_model_card(tmp, self)
            if path.exists():
                old = path.with_name(f".old-{path.name}")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        self.accelerator.wait_for_everyone()
        return path

    def push_to_hub(self, repo_id: str | None = None, endpoint: str | None = None, token: str | None = None) -> str:
        from .hub import push_folder

        repo_id = repo_id or self.config.hub_model_id
        if not repo_id:
            raise TrlVideoError("push_to_hub needs hub_model_id (e.g. user/my-video-model)")
        folder = self.output_dir / "model"
        if not folder.exists():
            self.save_model()
        from .hub import write_model_card

        write_model_card(folder, self, repo_id=repo_id)
        return push_folder(folder, repo_id, private=self.config.hub_private, endpoint=endpoint, token=token)

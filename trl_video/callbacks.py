"""Training callbacks through transformers' ``CallbackHandler``, so stock ``TrainerCallback`` classes work.

The trainer has no ``TrainingArguments``: callbacks receive the :class:`~trl_video.config.VideoRewardConfig` as
``args`` (stock callbacks that read only ``state``/``control``/``logs`` work, e.g. ``PrinterCallback``,
``ProgressCallback``; those that read TrainingArguments fields, such as ``EarlyStoppingCallback``'s
``metric_for_best_model``, do not). Events: ``on_train_begin``, ``on_step_begin``, ``on_rollout`` (ours),
``on_step_end``, ``on_log``, ``on_save``, ``on_train_end``; every event also gets ``trainer=`` the trainer.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_callback import CallbackHandler


class VideoRewardCallback(TrainerCallback):
    """A ``TrainerCallback`` with the video trainer's extra event (subclassing it is optional)."""

    def on_rollout(self, args: Any, state: TrainerState, control: TrainerControl, rollouts: Any = None,
                   **kwargs: Any) -> TrainerControl | None:
        """After the sampler, the reward and the estimator, before replay and the loss: ``rollouts`` is this
        micro-batch's :class:`~trl_video.rollouts.Rollouts` (``rewards`` and ``advantages`` filled in).
        Treat it as read-only."""
        return None


class StopAfterStep(VideoRewardCallback):
    """Stop after global step ``step`` without changing ``max_steps`` (the LR schedule keeps its length): a
    time-boxed job or an emulated preemption. ``--resume`` continues from the newest checkpoint (choose ``step`` a
    multiple of ``save_steps`` to lose nothing)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl | None:
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


class VideoCallbackHandler(CallbackHandler):
    """transformers' ``CallbackHandler`` plus ``on_rollout``; events go only to the callbacks that define them."""

    def __init__(self, callbacks: list[Any], model: Any, optimizer: Any = None, lr_scheduler: Any = None):
        # CallbackHandler warns when DefaultFlowCallback is missing: that callback drives TrainingArguments'
        # logging/saving strategies, which this trainer does not have (it logs and saves on its own schedule)
        log = logging.getLogger("transformers.trainer_callback")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            super().__init__(callbacks, model, None, optimizer, lr_scheduler)
        finally:
            log.setLevel(level)

    def on_rollout(self, args: Any, state: TrainerState, control: TrainerControl, rollouts: Any,
                   **kwargs: Any) -> TrainerControl:
        return self.call_event("on_rollout", args, state, control, rollouts=rollouts, **kwargs)

    def call_event(self, event: str, args: Any, state: TrainerState, control: TrainerControl,
                   **kwargs: Any) -> TrainerControl:
        """``CallbackHandler.call_event``, except that a callback without a method for the event is skipped
        (stock callbacks have no ``on_rollout``; plain objects may define only the events they need)."""
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is None:
                continue
            result = fn(args, state, control, model=self.model, processing_class=self.processing_class,
                        optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
                        train_dataloader=self.train_dataloader, eval_dataloader=self.eval_dataloader, **kwargs)
            if result is not None:  # a callback may return control instead of changing it in place
                control = result
        return control

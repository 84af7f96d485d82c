"""Callbacks through transformers' CallbackHandler (stock callbacks, on_rollout, stopping) and trackers through
accelerate (TensorBoard events read back with TensorBoard's EventAccumulator)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import PrinterCallback, ProgressCallback

from trl_video import VideoRewardTrainer
from trl_video.callbacks import VideoRewardCallback
from trl_video.config import VideoRewardConfig
from trl_video.errors import ConfigError


def tiny_config(out: Path, **kw: Any) -> VideoRewardConfig:
    base: dict[str, Any] = dict(model="tiny-wan-random", method="refl", reward="luminance",
                                sampler_args={"num_steps": 2, "grad_steps": 1}, prompts_per_step=2, group_size=1,
                                max_steps=3, save_model_at_end=False, output_dir=str(out), lora_r=2)
    base.update(kw)
    return VideoRewardConfig(**base)


class Recorder(VideoRewardCallback):
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.rollouts: list[Any] = []

    def on_step_begin(self, args, state, control, **kw):
        self.events.append(("step_begin", state.global_step))

    def on_rollout(self, args, state, control, rollouts=None, **kw):
        assert isinstance(args, VideoRewardConfig) and kw["trainer"] is not None and kw["model"] is not None
        self.events.append(("rollout", state.global_step))
        self.rollouts.append(rollouts)

    def on_log(self, args, state, control, logs=None, **kw):
        self.events.append(("log", state.global_step))


class StopAfterFirstStep:  # a plain object: callbacks need not subclass TrainerCallback
    def on_step_end(self, args, state, control, **kw):
        control.should_training_stop = True


def test_callbacks_stock_rollout_and_stop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec = Recorder()
    tr = VideoRewardTrainer(tiny_config(tmp_path / "a", report_to="none"),
                            callbacks=[rec, PrinterCallback(), ProgressCallback()])
    tr.add_callback(StopAfterFirstStep)  # a class is instantiated, as in transformers
    assert tr.train()["global_step"] == 1
    assert rec.events == [("step_begin", 0), ("rollout", 0), ("log", 1)]
    (batch,) = rec.rollouts  # after reward and estimator: rewards and prompts of the step's micro-batch
    assert batch.rewards is not None and batch.rewards.shape == (2,) and len(batch.prompts) == 2
    out = capsys.readouterr().out
    assert "'reward_mean'" in out  # PrinterCallback printed the logs
    assert tr.state.log_history[0]["step"] == 1 and tr.state.global_step == 1


def test_tensorboard_is_the_default_tracker(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    tr = VideoRewardTrainer(tiny_config(out))
    assert tr.config.trackers == ["tensorboard"]
    tr.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(out / "tensorboard" / "run")).Reload()
    events = acc.Scalars("reward_mean")
    assert [e.step for e in events] == [1, 2, 3]
    assert [round(e.value, 5) for e in events] == [round(r["reward_mean"], 5) for r in rows]
    assert "lr/policy" in acc.Tags()["scalars"]


def test_report_to_names_unknown_or_missing_trackers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="report_to must name trackers"):
        tiny_config(tmp_path, report_to="tensorbored")
    assert tiny_config(tmp_path, report_to="tensorboard, wandb").trackers == ["tensorboard", "wandb"]
    assert tiny_config(tmp_path, report_to=["none"]).trackers == []
    from accelerate.tracking import get_available_trackers

    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    missing = next((t for t in ("aim", "clearml", "dvclive", "swanlab", "mlflow") if t not in available), None)
    if missing is None:
        pytest.skip("every optional tracker is installed here")
    with pytest.raises(ConfigError, match=f"tracker '{missing}' is not installed"):
        VideoRewardTrainer(tiny_config(tmp_path / "x", report_to=missing))
    assert not (tmp_path / "x").exists()

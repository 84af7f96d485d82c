"""``RewardForcingConfig``: every Reward-Forcing option (recipe key ``method_args``).

Paper: Zhang et al., "Reward-Forcing: Autoregressive Video Generation with Reward Feedback" (App. B.2 for the
optimiser / EMA values; Sec. 3.2 for the last-frame objective; Sec. 5.1 / 5.2 for the DMD and random-frame
ablations). Values the paper does not state are marked "(ours)".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from trl_video.config import MethodConfig
from trl_video.config import doc_field as _f
from trl_video.errors import ConfigError


@dataclass
class RewardForcingConfig(MethodConfig):
    """Configuration of the Reward-Forcing loss (``method: reward-forcing``; keys go under ``method_args``)."""

    # ---- the causal generator
    chunk_size: int = _f(1, "Latent frames per autoregressive chunk when the loaded model is the bidirectional "
                            "teacher (1 = frame-wise; Self-Forcing's chunk-wise Wan uses 3 of 21). A model that is "
                            "already causal keeps its own chunk_size.", ge=1)

    # ---- stage 1: ODE initialisation (regression on teacher ODE trajectories)
    ode_steps: int = _f(0, "Training steps of stage 1 (ODE regression) before stage 2 starts; 0 = reward stage "
                           "only (start from an ODE-initialised causal model), >= max_steps = stage 1 only.", ge=0)
    ode_dataset: str | None = _f(None, "Folder of the teacher ODE-trajectory HF dataset, built once by "
                                       "`trl-video bench reward_forcing.build-ode` from a checkout (needed, and checked by a "
                                       "dry run, when ode_steps > 0).")
    ode_batch_size: int | None = _f(None, "Trajectories per stage-1 micro-batch (default: the recipe's per-process "
                                          "batch).", ge=1)

    # ---- stage 2: reward on the self-rolled-out video
    frames: Literal["last", "random"] = _f("last", "Which decoded frames the reward scores: 'last' (the paper: the "
                                                   "last frame of the video) or 'random' (a random frame per sample; "
                                                   "the ablation that loses motion).")
    num_random_frames: int = _f(1, "Frames drawn per sample when frames='random' (ours: 1, like 'last').", ge=1)
    reward_weight: float = _f(1.0, "Weight of -R in the stage-2 loss.", ge=0.0)
    dmd_weight: float = _f(0.0, "Weight of the DMD term (the paper's reward + distillation ablation, Sec. 5.1); "
                                "0 = reward only (the paper's method). The DMD gradient is rescaled to the reward "
                                "gradient's norm so both are on the same scale (App. B.2).", ge=0.0)
    fake_updates: int = _f(5, "Fake-score updates per generator step when dmd_weight > 0 (DMD2 / Self-Forcing: 5).", ge=1)
    fake_lr: float | None = _f(None, "Learning rate of the fake score model (default: the trainer's).")
    teacher: str | None = _f(None, "Real score of the DMD term: a bidirectional model (preset, folder, hub id). Default: "
                                   "the run's starting model (the teacher when stage 1 runs in the same recipe; "
                                   "set it when stage 2 starts from an ODE-initialised folder).")
    real_guidance_scale: float = _f(1.0, "CFG scale of the real (teacher) score in the DMD term.")
    dmd_t_min: float = _f(0.02, "Lower end of the DMD noise level t (DMD2: 0.02).", ge=0.0, le=1.0)
    dmd_t_max: float = _f(0.98, "Upper end of the DMD noise level t (DMD2: 0.98).", ge=0.0, le=1.0)

    def validate(self) -> None:
        super().validate()
        self.require(self.dmd_t_min < self.dmd_t_max, "dmd_t_min", f"must be < dmd_t_max={self.dmd_t_max}")
        if self.ode_steps > 0:  # stage 1 reads the trajectories from its first step: a dry run checks they exist
            self._check_ode_dataset()

    def _check_ode_dataset(self) -> None:
        from trl_video.bench_discovery import missing_path_hint

        from .ode import META

        path = self.ode_dataset
        if path and (Path(path).expanduser() / META).is_file():
            return
        hint = (missing_path_hint(path) if path else "") or (
            f"; build it with: trl-video bench reward_forcing.build-ode --out {path or 'DIR'} (from a checkout)")
        what = f"'{path}' is not an ODE-trajectory dataset (no {META})" if path else "is not set"
        raise ConfigError(f"{self.key_prefix}ode_dataset: {what}, needed when ode_steps > 0{hint}",
                          key=f"{self.key_prefix}ode_dataset")

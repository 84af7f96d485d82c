"""``RewardForcingConfig``: every Reward-Forcing option (recipe key ``method_args``).

Paper: Zhang et al., "Reward-Forcing: Autoregressive Video Generation with Reward Feedback" (App. B.2 for the
optimiser / EMA values; Sec. 3.2 for the last-frame objective; Sec. 5.1 / 5.2 for the DMD and random-frame
ablations). Values the paper does not state are marked "(ours)".
"""

from __future__ import annotations

from dataclasses import dataclass

from trl_video.config import doc_field as _f

from .errors import RewardForcingError


@dataclass
class RewardForcingConfig:
    """Configuration of the Reward-Forcing loss (``method: reward-forcing``; keys go under ``method_args``)."""

    # ---- the causal generator
    chunk_size: int = _f(1, "Latent frames per autoregressive chunk when the loaded model is the bidirectional "
                            "teacher (1 = frame-wise; Self-Forcing's chunk-wise Wan uses 3 of 21). A model that is "
                            "already causal keeps its own chunk_size.")

    # ---- stage 1: ODE initialisation (regression on teacher ODE trajectories)
    ode_steps: int = _f(0, "Training steps of stage 1 (ODE regression) before stage 2 starts; 0 = reward stage "
                           "only (start from an ODE-initialised causal model), >= max_steps = stage 1 only.")
    ode_dataset: str | None = _f(None, "Folder of the teacher ODE-trajectory HF dataset, built once by "
                                       "`trl-video bench reward-forcing build-ode` (needed when ode_steps > 0).")
    ode_batch_size: int | None = _f(None, "Trajectories per stage-1 micro-batch (default: the recipe's per-process "
                                          "batch).")

    # ---- stage 2: reward on the self-rolled-out video
    frames: str = _f("last", "Which decoded frames the reward scores: 'last' (the paper: the last frame of the "
                             "video) or 'random' (a random frame per sample; the ablation that loses motion).")
    num_random_frames: int = _f(1, "Frames drawn per sample when frames='random' (ours: 1, like 'last').")
    reward_weight: float = _f(1.0, "Weight of -R in the stage-2 loss.")
    dmd_weight: float = _f(0.0, "Weight of the DMD term (the paper's reward + distillation ablation, Sec. 5.1); "
                                "0 = reward only (the paper's method). The DMD gradient is rescaled to the reward "
                                "gradient's norm so both are on the same scale (App. B.2).")
    fake_updates: int = _f(5, "Fake-score updates per generator step when dmd_weight > 0 (DMD2 / Self-Forcing: 5).")
    fake_lr: float | None = _f(None, "Learning rate of the fake score model (default: the trainer's).")
    real_guidance_scale: float = _f(1.0, "CFG scale of the real (teacher) score in the DMD term.")
    dmd_t_min: float = _f(0.02, "Lower end of the DMD noise level t (DMD2: 0.02).")
    dmd_t_max: float = _f(0.98, "Upper end of the DMD noise level t (DMD2: 0.98).")

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise RewardForcingError(f"method_args.chunk_size must be >= 1, got {self.chunk_size}")
        if self.frames not in ("last", "random"):
            raise RewardForcingError(f"method_args.frames must be 'last' or 'random', got '{self.frames}'")
        if self.ode_steps < 0:
            raise RewardForcingError(f"method_args.ode_steps must be >= 0, got {self.ode_steps}")
        if self.num_random_frames < 1:
            raise RewardForcingError(f"method_args.num_random_frames must be >= 1, got {self.num_random_frames}")
        if self.dmd_weight < 0 or self.reward_weight < 0:
            raise RewardForcingError("method_args.reward_weight and dmd_weight must be >= 0")
        if not 0.0 <= self.dmd_t_min < self.dmd_t_max <= 1.0:
            raise RewardForcingError("method_args: need 0 <= dmd_t_min < dmd_t_max <= 1")

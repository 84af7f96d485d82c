"""``FCRMConfig``: every FCRM option (recipe key ``method_args``), defaults from the paper's Table 4 and App. D.

Paper: "Efficient Off-Policy RL for Video Generation via Forward-Consistent Reward Matching" (FCRM).
Values the paper does not state are marked "(ours)" in the help text and in the README.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trl_video.config import MethodConfig
from trl_video.config import doc_field as _f


@dataclass
class FCRMConfig(MethodConfig):
    """Configuration of the FCRM loss (``method: fcrm``; keys go under ``method_args``)."""

    # ---- residual g = b_phi(c) - beta * signal + (L_ref - L_theta) / gamma
    beta: float = _f(1.0, "Reward temperature beta (Table 4: 1).")
    gamma: float = _f(1.0, "Loss-score temperature gamma: S_theta = exp(-L_theta / gamma) (Table 4: 1).", gt=0.0)
    signal: Literal["advantage", "reward"] = _f("advantage", "What multiplies beta in the online residual: 'advantage' (detached "
                                  "group-normalised advantage from the `group` estimator; the paper's practice, "
                                  "App. D.2) or 'reward' (raw reward r; the paper's theory, Eq. 4).")
    estimator: Literal["double", "naive"] = _f("double", "Squared-residual estimator: 'double' (two independent noising batches A, B; "
                                  "surrogate sg(g_A) g_B + sg(g_B) g_A, unbiased; Sec. 3.3, Eq. 7) or 'naive' "
                                  "(g_A^2 from one batch, biased upward by Var(g_hat); Prop. 1; ablation only).")
    n_mc: int = _f(1, "Monte Carlo (t, eps) draws per noising batch, shared by policy and reference (CRN) "
                      "(Table 4: N_mc = 1).", ge=1)

    # ---- forward denoising loss L(x0; c) = mean_j w(t_j) || n(x_t_j, t_j, c) - target(x0, eps_j, t_j) ||^2
    timestep_dist: Literal["uniform", "logit_normal", "sampler"] = _f("uniform", "Distribution of t: 'uniform' on [t_min, t_max] (Table 4), 'logit_normal' "
                                       "(SD3-style, ours), or 'sampler' (few-step: uniform over the K timesteps of "
                                       "the recipe's `fewstep` sampler; App. D.3).")
    timestep_set: list[float] | None = _f(None, "Explicit K timesteps (t in [0,1], 1 = noise) to draw t from "
                                                 "uniformly; overrides timestep_dist (few-step generators, App. D.3).")
    t_min: float = _f(0.0, "Lower end of the uniform / logit-normal t range.")
    t_max: float = _f(1.0, "Upper end of the uniform / logit-normal t range.")
    logit_mean: float = _f(0.0, "Mean of the logit-normal t distribution (ours).")
    logit_std: float = _f(1.0, "Std of the logit-normal t distribution (ours).")
    weighting: Literal["uniform", "snr"] = _f("uniform", "Loss weight w(t): 'uniform' (Table 4) or 'snr' = min(alpha^2/sigma^2, snr_max).")
    snr_max: float = _f(5.0, "Cap of the SNR weight (ours).")

    # ---- b_phi(c): the condition-dependent log-normaliser (App. D.1)
    b_phi_hidden: int = _f(256, "Hidden width of the b_phi MLP (App. D.1: 256).")
    b_phi_layers: int = _f(2, "Hidden layers of the b_phi MLP (SiLU); the last linear layer is zero-initialised.")
    b_phi_lr: float = _f(1e-3, "Learning rate of b_phi (Table 4: 1e-3; theta uses the trainer's learning_rate, 1e-4).")
    b_phi_weight_decay: float = _f(1e-4, "AdamW weight decay of b_phi (Table 4: 1e-4).")

    # ---- offline branch (App. D.2)
    offline_mix: bool = _f(True, "When the recipe names offline_latents and the batch is online/replay, add the "
                                 "offline FCRM branch: L_online + lambda_offline * L_offline (hybrid).")
    lambda_offline: float = _f(1.0, "Weight of the offline branch in the hybrid objective (ours: 1).")
    offline_batch_size: int | None = _f(None, "Offline samples per micro-batch (default: match the online count).")
    offline_advantage: Literal["signed", "nonnegative", "reward"] = _f("signed", "Offline signal: 'signed' (r - mu)/(sigma + eps) or 'nonnegative' "
                                          "clip((r - mu)/(sigma + eps) + a0, 0, A_max); 'reward' uses raw r.")
    offline_a0: float = _f(1.0, "Offset a0 of the non-negative offline advantage (App. D.2: 1.0).")
    offline_a_max: float = _f(3.0, "Upper clip A_max of the non-negative offline advantage (ours: 3).")
    offline_norm_decay: float = _f(0.9, "EMA decay of the offline reward mean / second moment (ours: 0.9).",
                                   ge=0.0, lt=1.0)
    offline_sigma_min: float = _f(1e-3, "Floor sigma_min of the offline reward std (ours).")
    offline_eps: float = _f(1e-4, "eps in (r - mu)/(sigma + eps).")
    offline_normalizer: Literal["scalar", "b_phi"] = _f("scalar", "Offline log-normaliser: 'scalar' (a learned source-level b_offline) "
                                           "or 'b_phi' (the online b_phi(c) with its gradient stopped).")
    offline_reward: Literal["auto", "dataset", "recompute"] = _f("auto", "Offline rewards: 'auto' (the dataset's reward column when finite, else "
                                     "computed by the recipe's reward), 'dataset' or 'recompute'.")

    def validate(self) -> None:
        super().validate()  # Literal choices, gamma > 0, n_mc >= 1, 0 <= offline_norm_decay < 1
        self.require(0.0 <= self.t_min < self.t_max <= 1.0, "t_max", f"must be in (t_min, 1] with t_min >= 0 "
                     f"(t_min = {self.t_min})")
        if self.timestep_set is not None:
            self.require(bool(self.timestep_set) and all(0.0 <= float(t) <= 1.0 for t in self.timestep_set),
                         "timestep_set", "must be a non-empty list in [0, 1]")

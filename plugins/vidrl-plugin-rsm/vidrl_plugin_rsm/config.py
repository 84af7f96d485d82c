"""``RSMConfig``: every RSM option (recipe key ``method_args``).

Paper: "Reward Score Matching: Unifying Reward-based Fine-tuning for Flow and Diffusion Models" (RSM). The
presets (``flow-grpo``, ``dance-grpo``, ...) are this dataclass with other defaults, see ``presets.py`` and the
README's defaults table. Values no paper states are marked "(ours)".
"""

from __future__ import annotations

from dataclasses import dataclass

from trl_video.config import MethodConfig
from trl_video.config import doc_field as _f
from trl_video.errors import TrlVideoError

GUIDANCE = ("zeroth_order", "first_order_current", "first_order_lookahead", "first_order_terminal")


@dataclass
class RSMConfig(MethodConfig):
    """Configuration of the RSM loss (``method: rsm`` or a preset; keys go under ``method_args``)."""

    # ---- the value-guidance estimator g_hat
    guidance: str = _f("zeroth_order", "Estimator of the value gradient: 'zeroth_order' (Stein: centred reward x "
                                       "transition noise; black-box rewards), 'first_order_current' (grad of "
                                       "r(x0_hat(x_t)) through the Tweedie Jacobian), 'first_order_lookahead' "
                                       "(grad through `lookahead_depth` ODE steps, then Tweedie), "
                                       "'first_order_terminal' (reward score distillation: grad r(x0) of the "
                                       "terminal sample used at every t).")
    lookahead_depth: int = _f(0, "Lookahead depth k in sampler steps; 0 = full rollout to t=0. Zeroth order: "
                                 "how far the loss-side branches run before the reward (Tweedie x0_hat at the "
                                 "landing step when k is short); first order: ODE steps differentiated through.")
    branching: list[int] | None = _f(None, "Zeroth order, loss-side branching profile B_t (one entry per sampler "
                                           "step): at step i with B_i > 0 the loss draws B_i SDE children of the "
                                           "trajectory state, rolls each `lookahead_depth` steps and scores them. "
                                           "None: use the sampler's own transitions and the batch advantages "
                                           "(GRPO / TempFlow-GRPO).")
    centring: str = _f("sibling", "Loss-side branches: subtract the mean reward of the siblings ('sibling') or "
                                  "not ('none'). Trajectory mode centres through the `group` estimator instead.")
    scale_norm: str = _f("std", "Loss-side branches: divide centred rewards by the sibling std ('std'), the mean "
                                "absolute centred reward ('mean_abs') or nothing ('none').")
    adv_eps: float = _f(1e-4, "eps in (r - mean) / (scale + eps).")
    adv_clip_max: float = _f(5.0, "Advantages are clipped to [-adv_clip_max, adv_clip_max] (Flow-GRPO: 5).")
    first_order_norm: str = _f("none", "First order: 'none' or 'batch_rms' (divide g_hat by its batch RMS; the "
                                       "paper's scale normalisation, App. G.3).")

    # ---- which transitions / states are trained
    timestep_fraction: float = _f(1.0, "Fraction of the trainable steps used per batch (Flow-GRPO: 0.99 -> 9 of 10; "
                                       "DanceGRPO: 0.6).")
    timestep_sampling: str = _f("first", "Which steps the fraction keeps: 'first' (Flow-GRPO) or 'random' per "
                                         "batch (DanceGRPO shuffles the steps).")
    train_steps: list[int] | None = _f(None, "First order: explicit sampler step indices to train on (default: "
                                             "every step but the last).")

    # ---- temporal weighting
    beta: float = _f(0.0, "KL weight to the reference (w_t = beta c_t^2 / (2 sigma_t^2) on SDE transitions; "
                          "Flow-GRPO: 0.004 - 0.04 by task, DanceGRPO: 0).")
    kl_form: str = _f("transition", "KL on an SDE transition: 'transition' = ||mu_theta - mu_ref||^2 / (2 sigma^2) "
                                    "(the exact Gaussian KL), or 'flow_grpo' = the same over 2 g_t^2 = 2 sigma^2 / |dt| "
                                    "(Flow-GRPO's code divides by its std_dev_t^2, without the sqrt(dt)).")
    temporal_weight: str = _f("none", "Per-step weight k_t of the guidance term: 'none' or 'noise' (TempFlow-GRPO's "
                                      "noise-aware weighting: k_t proportional to the transition std, mean 1).")
    guidance_scale: float = _f(1.0, "First order: lambda_0 in lambda_t = lambda_0 * schedule(t).")
    lambda_schedule: str = _f("alpha", "First order lambda_t schedule: 'alpha2' (alpha_t^2: the down-weighting of "
                                       "low-SNR steps inherited from Tweedie-based methods), 'alpha' (the reward "
                                       "score distillation redesign: that down-weighting reversed to alpha_t), "
                                       "'constant'.")

    # ---- trust region
    trust_region: str = _f("clip", "'clip' (PPO clipping of the ratio), 'anchor' (quadratic anchor rho ||s_theta - "
                                   "sg(s_old)||^2 to the policy that sampled the batch) or 'none'.")
    clip_range: float = _f(1e-4, "PPO clip range epsilon (Flow-GRPO / DanceGRPO: 1e-4).")
    clip_surrogate: str = _f("ratio", "'ratio' (PPO: the guidance carries sg(r)) or 'log_ratio' (PCPO's clipped "
                                      "log-ratio surrogate).")
    clip_mode: str = _f("standard", "'standard': clip the raw ratio; 'fair' (RSM Eq. 24): clip the log-ratio "
                                    "normalised by its timestep scale and apply that scale outside the clip.")
    anchor_weight: float = _f(1.0, "rho of the quadratic anchor (trust_region 'anchor'), in native-output units.")
    updates_per_batch: int = _f(1, "Optimiser updates per sampled batch (PPO inner steps; the ratio is exactly 1 "
                                    "on the first).")

    def validate(self) -> None:
        super().validate()
        choices = {"guidance": GUIDANCE, "centring": ("sibling", "none"), "scale_norm": ("std", "mean_abs", "none"),
                   "first_order_norm": ("none", "batch_rms"), "timestep_sampling": ("first", "random"),
                   "temporal_weight": ("none", "noise"), "kl_form": ("transition", "flow_grpo"), "lambda_schedule": ("alpha2", "alpha", "constant"),
                   "trust_region": ("clip", "anchor", "none"), "clip_surrogate": ("ratio", "log_ratio"),
                   "clip_mode": ("standard", "fair")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise TrlVideoError(f"method_args.{key} must be one of {'|'.join(allowed)}, got '{getattr(self, key)}'")
        if self.lookahead_depth < 0:
            raise TrlVideoError(f"method_args.lookahead_depth must be >= 0, got {self.lookahead_depth}")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise TrlVideoError(f"method_args.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.branching is not None and any(int(b) < 0 or int(b) == 1 for b in self.branching):
            raise TrlVideoError(f"method_args.branching entries must be 0 (no branching) or >= 2 (a centred "
                                f"estimate needs siblings), got {self.branching}")
        if self.beta < 0 or self.clip_range <= 0 or self.anchor_weight < 0:
            raise TrlVideoError("method_args: need beta >= 0, clip_range > 0, anchor_weight >= 0")
        if self.updates_per_batch < 1:
            raise TrlVideoError(f"method_args.updates_per_batch must be >= 1, got {self.updates_per_batch}")

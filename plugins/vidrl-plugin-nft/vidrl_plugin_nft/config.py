"""``NFTConfig``: every DiffusionNFT option (recipe key ``method_args``).

Paper: Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process" (arXiv 2509.16117).
Defaults are the paper's SD3.5-M PickScore / GenEval setting (its public training script); the OCR setting is
``beta: 0.1, old_decay_flat: 75, old_decay_rate: 0.0075, old_decay_max: 0.999``.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl_video.config import MethodConfig
from trl_video.config import doc_field as _f


@dataclass
class NFTConfig(MethodConfig):
    """Configuration of the DiffusionNFT loss (``method: nft``; keys go under ``method_args``)."""

    beta: float = _f(1.0, "Guidance strength beta of the implicit policies v+ = (1 - beta) v_old + beta v_theta and "
                          "v- = (1 + beta) v_old - beta v_theta (paper: 1.0; OCR: 0.1).", gt=0.0)
    adv_clip_max: float = _f(5.0, "Advantages are clipped to [-c, c] and mapped to the optimality probability "
                                  "r = clip(A / (2c) + 1/2, 0, 1); the loss is scaled by c (paper's script: 5).", gt=0.0)
    timestep_fraction: float = _f(0.99, "Training timesteps per sample: the first int(S * fraction) points of the "
                                        "sampler's S-step grid (paper: 0.99, i.e. 9 of 10).", gt=0.0, le=1.0)
    timesteps_per_step: int | None = _f(None, "How many of those grid timesteps (a random subset per sample) each "
                                              "training step uses; None = all of them, as the paper accumulates "
                                              "one update over every training timestep. Set 1-2 to bound memory on "
                                              "large models (ours).", ge=1)
    adaptive_weighting: bool = _f(True, "Divide each sample's x0 regression error by its detached mean absolute "
                                        "error (the paper's adaptive loss weighting); False = plain squared error.")
    kl_weight: float = _f(1e-4, "Weight of ||v_theta - v_ref||^2 to the reference (base) model (paper: 1e-4 on "
                                "SD3.5-M).", ge=0.0)
    old_decay_flat: int = _f(0, "Old-policy EMA: decay 0 (old = current after every update) for this many "
                                "optimiser steps (paper: 0; OCR: 75).", ge=0)
    old_decay_rate: float = _f(0.001, "Old-policy EMA decay grows by this much per optimiser step after the flat "
                                      "part (paper: 0.001; OCR: 0.0075).", ge=0.0)
    old_decay_max: float = _f(0.5, "Cap of the old-policy EMA decay (paper: 0.5; OCR: 0.999).", ge=0.0, le=1.0)

    def old_decay(self, n: int) -> float:
        """Decay of the old policy's EMA after ``n`` optimiser steps: 0 for ``n < flat``, else
        ``min(rate * (n - flat), max)`` (the paper's script, ``return_decay``)."""
        if n < self.old_decay_flat:
            return 0.0
        return min(self.old_decay_rate * (n - self.old_decay_flat), self.old_decay_max)

"""``method_args`` of VELR (defaults from the paper; the README's table gives each source)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from trl_video.config import MethodConfig
from trl_video.config import doc_field as _f


@dataclass
class VELRConfig(MethodConfig):
    """Configuration of VELR (ensemble latent reward models + truncated mid-step ReFL + online alignment)."""

    kl_weight: float = _f(10.0, "beta: weight of the KL to the initial model (App. C.2: 10). The KL is the "
                                "native-output MSE between the policy and the frozen initial model "
                                "(LoRA disabled) at the last grad step of the window.")
    kl_at: Literal["last_step", "random_t"] = _f("last_step", "Where the KL is evaluated: last_step (the input of the sampler's last "
                                 "network evaluation with grad) | random_t (ReFL's anchor: re-noised x0).")
    reward_scale: float = _f(1.0, "Multiplier of the LRM reward term -R_l.")
    aggregation: Literal["mean", "min", "max"] | None = _f(None, "Override the LRM's aggregation for training: mean | min | max "
                                       "(Eq. 7; None keeps the LRM's own, default mean).")
    pixel_reward: str | None = _f(None, "The TRUE pixel-space reward for online alignment and monitoring "
                                        "(scored on decoded samples without grad), e.g. alignment. Required "
                                        "when the recipe's reward is `lrm`; otherwise defaults to the "
                                        "recipe's reward.")
    pixel_reward_args: dict[str, Any] = _f({}, "Constructor arguments of pixel_reward.")
    lrm_path: str | None = _f(None, "Pretrained LRM folder, used when the recipe's reward is not `lrm` "
                                    "(then the recipe's reward is the true reward).")
    lrm_args: dict[str, Any] = _f({}, "LRM constructor arguments when built here (members, widths, heads, "
                                      "layers, aggregation, seed).")
    online_alignment: bool = _f(True, "Fine-tune the LRM online on the variance-organised replay buffer.")
    align_every: int = _f(10, "M: run LRM alignment after every M diffusion steps (App. C.2: 10).", ge=1)
    align_rounds: int = _f(2, "R: rounds of LRM alignment each time (App. C.2: 2).", ge=1)
    align_steps_per_round: int | None = _f(None, "Optimiser steps in one round (None: one pass over the "
                                                 "buffer, ceil(len / align_batch_size)).")
    align_batch_size: int = _f(4, "Minibatch of the LRM alignment per member (App. C.1: batch size 4).",
                               ge=1)
    align_lr: float = _f(1e-5, "Learning rate of the LRM during online alignment (App. C.2: 1e-5).")
    align_max_grad_norm: float = _f(0.0, "Gradient clipping of the LRM (0: off; clipping the joint norm "
                                         "would couple the independent members).")
    huber_delta: float = _f(1.0, "delta of the Huber loss (Eq. 6; the paper gives no value).")
    buffer_size: int = _f(256, "Replay buffer capacity (App. C.2: 256).")
    buffer_admit: Literal["always", "top"] = _f("always", "always: new samples evict the lowest-variance old ones (App. C.2) | "
                                     "top: keep the highest-variance items of old + new (Sec. 4.3).")
    true_reward_every: int = _f(1, "Score the true pixel reward of the step's samples (no-grad decode, after "
                                   "the policy backward) every N steps and insert them into the buffer; 0 = "
                                   "never (only allowed with online_alignment false).")
    true_reward_batch: int = _f(2, "Samples decoded at once when scoring the true reward (no grad, so chunking "
                                   "changes nothing but the peak memory of the decode; 0 = whole batch). 2, not "
                                   "1: on CPU PyTorch runs a batch-1 conv3d through its im2col path (a 30 MB "
                                   "buffer for a 9x32x32 tiny-cogvideox decode, vs 18 MB for 2 samples via "
                                   "oneDNN).")

    def validate(self) -> None:
        super().validate()  # Literal choices (kl_at, aggregation, buffer_admit), align_* >= 1
        self.require(not self.online_alignment or self.true_reward_every >= 1, "true_reward_every",
                     "must be >= 1 with online_alignment (the buffer holds true rewards)")

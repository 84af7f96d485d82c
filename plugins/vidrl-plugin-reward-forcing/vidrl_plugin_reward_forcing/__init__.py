"""Reward-Forcing for trl-video: a chunk-wise autoregressive (block-causal, KV-cached) Wan generator initialised
from the bidirectional teacher's ODE trajectories, then trained with reward feedback on its self-rolled-out video."""

from __future__ import annotations

from typing import Any

from trl_video import hookimpl
from trl_video.plugins import MethodSpec

from .config import RewardForcingConfig
from .errors import RewardForcingError
from .loss import RewardForcingLoss
from .model import CausalWanTransformer3DModel, KVCache, bidirectional, is_causal
from .sampler import SelfRolloutSampler

__all__ = ["REWARD_FORCING", "CausalWanTransformer3DModel", "KVCache", "RewardForcingConfig", "RewardForcingLoss",
           "SelfRolloutSampler", "bidirectional", "make_causal"]
__version__ = "0.1.0"

CITATION = (
    "@article{zhang2025rewardforcing, title={Reward-Forcing: Autoregressive Video Generation with Reward Feedback}, "
    "author={Zhang, Jingran and Li, Ning and Ban, Yuanhao and Bai, Andrew and Cui, Justin}, year={2025}}\n"
    "@article{huang2025selfforcing, title={Self Forcing: Bridging the Train-Test Gap in Autoregressive Video "
    "Diffusion}, author={Huang, Xun and Li, Zhengqi and He, Guande and Zhou, Mingyuan and Shechtman, Eli}, "
    "journal={arXiv:2506.08009}, year={2025}}"
)


def make_causal(policy: Any, cfg: RewardForcingConfig | None = None) -> None:
    """``MethodSpec.prepare_policy``: replace a bidirectional Wan transformer by its block-causal version with the
    same weights (idempotent: an already causal model keeps its own chunk size)."""
    cfg = cfg or RewardForcingConfig()
    if is_causal(policy.transformer):
        return
    if policy.family != "wan":
        raise RewardForcingError(f"reward-forcing: the causal generator is built on Wan; model family is "
                                 f"'{policy.family}'")
    frames = policy.latent_shape[1]
    if frames % cfg.chunk_size:
        raise RewardForcingError(f"reward-forcing: {frames} latent frames are not a whole number of chunks of "
                                 f"method_args.chunk_size={cfg.chunk_size}")
    policy.transformer = CausalWanTransformer3DModel.from_teacher(policy.transformer, chunk_size=cfg.chunk_size)


REWARD_FORCING = MethodSpec(
    name="reward-forcing",
    config_cls=RewardForcingConfig,
    defaults={"sampler": "self_rollout", "estimator": "none", "replay": "fresh", "loss": "reward-forcing"},
    default_args={"sampler": {"num_steps": 4, "grad": "last"}},
    description=("Reward-Forcing: block-causal autoregressive Wan (KV cache, K=4 steps per chunk), ODE-trajectory "
                 "initialisation, then -R(last frame) of the self-rolled-out video (option: + DMD)."),
    paper="Zhang et al. 2025, Reward-Forcing: Autoregressive Video Generation with Reward Feedback; builds on "
          "Self-Forcing (Huang et al. 2025) and CausVid (Yin et al., CVPR 2025)",
    citation=CITATION,
    prepare_policy=make_causal,
)


@hookimpl
def trl_video_register_methods(register):
    register("reward-forcing", REWARD_FORCING)


@hookimpl
def trl_video_register_samplers(register):
    register("self_rollout", SelfRolloutSampler)


@hookimpl
def trl_video_register_losses(register):
    register("reward-forcing", RewardForcingLoss)

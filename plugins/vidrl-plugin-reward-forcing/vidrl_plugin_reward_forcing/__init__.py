"""Reward-Forcing for trl-video: a chunk-wise autoregressive (block-causal, KV-cached) Wan generator initialised
from the bidirectional teacher's ODE trajectories, then trained with reward feedback on its self-rolled-out video."""

from trl_video import hookimpl

from .model import CausalWanTransformer3DModel, KVCache, bidirectional
from .sampler import SelfRolloutSampler

__all__ = ["CausalWanTransformer3DModel", "KVCache", "SelfRolloutSampler", "bidirectional"]
__version__ = "0.1.0"


@hookimpl
def trl_video_register_samplers(register):
    register("self_rollout", SelfRolloutSampler)

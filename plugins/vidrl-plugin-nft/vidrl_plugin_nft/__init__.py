"""vidrl-plugin-nft: DiffusionNFT (Zheng et al. 2025) for trl-video, the forward-process baseline.

Registers the loss ``nft`` and the method ``nft``: clean samples from the old policy (the policy's EMA, sampled
with the core's deterministic ``ode`` sampler, CFG-free), group-normalised rewards (core ``group`` estimator),
and the negative-aware flow-matching loss of ``loss.py``.
"""

from __future__ import annotations

from trl_video import hookimpl
from trl_video.plugins import MethodSpec

from .config import NFTConfig
from .loss import NFTLoss, nft_objective, optimality_probability

__all__ = ["CITATION", "NFT", "NFTConfig", "NFTLoss", "nft_objective", "optimality_probability"]
__version__ = "0.1.0"

CITATION = """@article{zheng2025diffusionnft,
  title   = {DiffusionNFT: Online Diffusion Reinforcement with Forward Process},
  author  = {Zheng, Kaiwen and Chen, Huayu and Ye, Haotian and Wang, Haoxiang and Zhang, Qinsheng and Jiang, Kai
             and Su, Hang and Ermon, Stefano and Zhu, Jun and Liu, Ming-Yu},
  journal = {arXiv preprint arXiv:2509.16117},
  year    = {2025}
}"""

NFT = MethodSpec(
    name="nft", config_cls=NFTConfig,
    description="DiffusionNFT: negative-aware fine-tuning on the forward process (clean samples only, any solver).",
    defaults={"sampler": "ode", "estimator": "group", "replay": "fresh", "loss": "nft"},
    # the old policy (the EMA) samples; deterministic solver, no trajectory kept (the loss needs clean samples only)
    default_args={"sampler": {"num_steps": 10, "behaviour": "ema", "record_trajectory": False},
                  "estimator": {"std": "group"}},
    paper="Zheng et al. 2025, DiffusionNFT (arXiv 2509.16117)", citation=CITATION)


@hookimpl
def trl_video_register_methods(register):
    register("nft", NFT)


@hookimpl
def trl_video_register_losses(register):
    register("nft", NFTLoss)

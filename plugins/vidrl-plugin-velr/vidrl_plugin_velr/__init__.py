"""VELR for trl-video: ensemble latent reward models, truncated mid-step ReFL and online LRM alignment.

Registers the method ``velr``, its loss ``velr``, the sampler ``velr_window`` and the reward ``lrm`` (a trained
ensemble as a differentiable latent-space reward any method can use). Building the LRM dataset, pre-training the
ensemble and the paper's measurements are benchmarks of the repository (``benchmarks/velr``:
``trl-video bench velr.build-dataset``, ``velr.pretrain``, ``velr.eval-lrm``, ``velr.compare``, ``velr.memory``).
"""

from __future__ import annotations

from trl_video import hookimpl
from trl_video.plugins import MethodSpec

from .config import VELRConfig
from .loss import VELRLoss
from .lrm import LRMReward
from .sampler import VELRWindowSampler

__version__ = "0.1.0"

VELR = MethodSpec(
    name="velr",
    config_cls=VELRConfig,
    defaults={"sampler": "velr_window", "estimator": "none", "replay": "fresh", "loss": "velr", "reward": "lrm"},
    default_args={"sampler": {"num_steps": 50, "grad_steps": 10, "start_range": [15, 25], "finish": "x0"}},
    description="ReFL on an ensemble latent reward model: truncated mid-step grads, KL to the initial model, "
                "online LRM alignment on a variance-organised buffer.",
    paper="VELR: Efficient Video Reward Feedback via Ensemble Latent Reward Models (ICLR 2026 submission)",
    citation=("@inproceedings{velr2026, title={{VELR}: Efficient Video Reward Feedback via Ensemble Latent "
              "Reward Models}, author={Anonymous}, booktitle={Submitted to the International Conference on "
              "Learning Representations}, year={2026}, note={under double-blind review}}"),
)


@hookimpl
def trl_video_register_methods(register):
    register("velr", VELR)


@hookimpl
def trl_video_register_losses(register):
    register("velr", VELRLoss)


@hookimpl
def trl_video_register_samplers(register):
    register("velr_window", VELRWindowSampler)


@hookimpl
def trl_video_register_rewards(register):
    register("lrm", LRMReward)


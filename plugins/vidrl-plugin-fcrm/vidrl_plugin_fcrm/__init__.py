"""vidrl-plugin-fcrm: FCRM (Forward-Consistent Reward Matching) for trl-video.

Registers the method ``fcrm`` (MethodSpec) and the loss ``fcrm``; its experiments are in the repository's
``benchmarks/fcrm`` (``trl-video bench fcrm.settings``, ``fcrm.lightness``, ``fcrm.build-offline``).
The behaviour distributions are the core's components: samplers ``ode``/``sde``/``fewstep`` (``behaviour:
ema`` with ``ema_decay``), replay ``fresh``/``fifo``/``offline`` (+ ``offline_latents`` for the hybrid).
"""

from __future__ import annotations

from trl_video import hookimpl
from trl_video.plugins import MethodSpec

from .config import FCRMConfig
from .loss import FCRMLoss

__all__ = ["FCRM", "FCRMConfig", "FCRMLoss"]
__version__ = "0.1.0"

CITATION = ("@misc{fcrm2026, title={Efficient Off-Policy RL for Video Generation via Forward-Consistent Reward "
            "Matching}, author={Anonymous}, howpublished={Anonymous submission (under review)}, year={2026}}")

FCRM = MethodSpec(
    name="fcrm",
    config_cls=FCRMConfig,
    defaults={"sampler": "ode", "estimator": "group", "replay": "fresh", "loss": "fcrm"},
    default_args={"sampler": {"num_steps": 10}},
    description=("Forward-Consistent Reward Matching: off-policy one-step GFlowNet residual "
                 "b_phi(c) - beta*A + (L_ref - L_theta)/gamma on forward denoising losses (CRN), double-sampled."),
    paper="Efficient Off-Policy RL for Video Generation via Forward-Consistent Reward Matching (FCRM), anonymous",
    citation=CITATION,
)


@hookimpl
def trl_video_register_methods(register):
    register("fcrm", FCRM)


@hookimpl
def trl_video_register_losses(register):
    register("fcrm", FCRMLoss)


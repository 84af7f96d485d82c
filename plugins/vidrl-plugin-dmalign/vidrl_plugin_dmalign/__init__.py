"""DM-Align for trl-video: one-stage DMD distillation of a multi-step teacher into a K-step generator,
jointly aligned with DM-PairLoss (preferred latents) or DM-GroupLoss (reward-ranked groups). Its experiments are in
the repository's ``benchmarks/dmalign`` (``trl-video bench dmalign.experiments <what>``)."""

from trl_video import hookimpl
from trl_video.plugins import MethodSpec

from .config import DMAlignConfig
from .loss import DMAlignLoss

__all__ = ["DMALIGN", "DMAlignConfig", "DMAlignLoss"]
__version__ = "0.1.0"

CITATION = (
    "@misc{dmalign2025, title={Unifying Reinforcement Learning and Distillation via Distribution Matching for "
    "Video Generation}, author={Anonymous}, note={Under double-blind review (DM-Align)}, year={2025}}\n"
    "@inproceedings{yin2024dmd2, title={Improved Distribution Matching Distillation for Fast Image Synthesis}, "
    "author={Yin, Tianwei and Gharbi, Micha{\\\"e}l and Park, Taesung and Zhang, Richard and Shechtman, Eli and "
    "Durand, Fredo and Freeman, William T.}, booktitle={NeurIPS}, year={2024}}"
)

DMALIGN = MethodSpec(
    name="dmalign",
    config_cls=DMAlignConfig,
    defaults={"sampler": "fewstep", "estimator": "group", "replay": "fresh", "loss": "dmalign"},
    default_args={"sampler": {"num_steps": 4, "grad": True}},
    description=("DM-Align: DMD distillation (real - fake score through a K-step generator) + DM-Pair/Group "
                 "alignment, fake score model updated 5x per generator step."),
    paper="Unifying Reinforcement Learning and Distillation via Distribution Matching for Video Generation "
          "(DM-Align, 2025); builds on DMD2 (Yin et al., NeurIPS 2024)",
    citation=CITATION,
)


@hookimpl
def trl_video_register_methods(register):
    register("dmalign", DMALIGN)


@hookimpl
def trl_video_register_losses(register):
    register("dmalign", DMAlignLoss)


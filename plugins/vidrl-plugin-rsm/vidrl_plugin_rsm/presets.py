"""The GRPO family and the RSM paper's redesigns as settings of the one RSM loss.

Each preset is a ``MethodSpec``: its sampler / estimator / loss with their arguments, and a config class =
``RSMConfig`` with the preset's defaults (a recipe's ``method_args`` still overrides any field). The README's
defaults table is generated from ``PRESETS`` (``python -m vidrl_plugin_rsm.presets``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from trl_video.plugins import MethodSpec

from .config import RSMConfig


@dataclass(frozen=True)
class Paper:
    """A paper a preset implements: its one-line reference (README table, ``MethodSpec.paper``) and its BibTeX entry
    (``MethodSpec.citation``, the model card) both come from these fields."""

    key: str
    title: str
    authors: str  # the BibTeX author field
    short: str  # as cited in the one-line reference, e.g. "Liu et al."
    venue: str
    year: int

    @property
    def reference(self) -> str:
        return f"{self.title} ({self.short}, {self.year}, {self.venue})"

    @property
    def bibtex(self) -> str:
        return (f"@article{{{self.key}, title={{{self.title}}}, author={{{self.authors}}}, journal={{{self.venue}}}, "
                f"year={{{self.year}}}}}")


@dataclass
class Preset:
    name: str
    paper: Paper
    description: str
    sampler: tuple[str, dict[str, Any]]
    method_args: dict[str, Any] = field(default_factory=dict)
    estimator: tuple[str, dict[str, Any]] = ("group", {"std": "group"})
    paper_note: str = ""  # appended to the reference (where in the paper's material this preset is described)

    @property
    def reference(self) -> str:
        return self.paper.reference + (f"; {self.paper_note}" if self.paper_note else "")


RSM = Paper("rsm2026", "Reward Score Matching: Unifying Reward-based Fine-tuning for Flow and Diffusion Models",
            "Anonymous (authors' code: github.com/jaylee2000/rsm)", "RSM", "preprint", 2026)
FLOW_GRPO = Paper("liu2025flowgrpo", "Flow-GRPO: Training Flow Matching Models via Online RL", "Liu, Jie and others",
                  "Liu et al.", "arXiv:2505.05470", 2025)
DANCE = Paper("xue2025dancegrpo", "DanceGRPO: Unleashing GRPO on Visual Generation", "Xue, Zeyue and others",
              "Xue et al.", "arXiv:2505.07818", 2025)
TEMPFLOW = Paper("he2025tempflow", "TempFlow-GRPO: When Timing Matters for GRPO in Flow Models",
                 "He, Xiaoxuan and others", "He et al.", "arXiv:2508.04324", 2025)
MIX = Paper("li2025mixgrpo", "MixGRPO: Unlocking Flow-based GRPO Efficiency with Mixed ODE-SDE",
            "Li, Junzhe and others", "Li et al.", "arXiv:2507.21802", 2025)
BRANCH = Paper("li2025branchgrpo", "BranchGRPO: Stable and Efficient GRPO with Structured Branching in Diffusion Models",
               "Li, Yuming and others", "Li et al.", "arXiv preprint", 2025)
RSM_CITE = RSM.bibtex

_FLOW_SDE = {"num_steps": 10, "sde_type": "flow_grpo", "eta": 0.7}
_GRPO = {"beta": 0.004, "clip_range": 1e-3, "adv_clip_max": 5.0, "timestep_fraction": 0.99, "kl_form": "flow_grpo"}

PRESETS: list[Preset] = [
    Preset("rsm", RSM,
           "Reward Score Matching: w_t ||s_theta - sg(s_ref + lambda_t g_hat)||^2 + trust region; every estimator, "
           "weighting and trust region is a method_arg (defaults: zeroth order on Flow-GRPO's SDE, PPO clip, KL).",
           ("sde", dict(_FLOW_SDE)), dict(_GRPO, kl_form="transition")),
    Preset("flow-grpo", FLOW_GRPO,
           "Flow-GRPO: Flow-GRPO SDE (a=0.7) on every step, group-normalised advantage, PPO clipped ratio + KL on "
           "the transition means (zeroth-order full-rollout RSM).",
           ("sde", dict(_FLOW_SDE)), dict(_GRPO)),
    Preset("flow-grpo-fast", FLOW_GRPO,
           "Flow-GRPO-Fast: SDE on a random window of 2 early steps, ODE elsewhere; trains only the window.",
           ("sde", dict(_FLOW_SDE, window_size=2, window_mode="random", window_range=[0, 3])),
           dict(_GRPO, timestep_fraction=1.0), paper_note="Flow-GRPO-Fast in its repository README"),
    Preset("dance-grpo", DANCE,
           "DanceGRPO: DanceGRPO's flow SDE (eta=0.3), 16 steps, one initial noise per group (init_same_noise), "
           "60% of the steps (random) per batch, PPO clip, no KL.",
           ("sde", {"num_steps": 16, "sde_type": "dance_grpo", "eta": 0.3, "same_noise": True}),
           {"beta": 0.0, "clip_range": 1e-4, "adv_clip_max": 5.0, "timestep_fraction": 0.6,
            "timestep_sampling": "random"}),
    Preset("mix-grpo", MIX,
           "MixGRPO: SDE inside a window of 4 steps that slides by 1 every 25 training steps (ODE outside); trains the "
           "window only; DanceGRPO's SDE and its one initial noise per group.",
           ("sde", {"num_steps": 16, "sde_type": "dance_grpo", "eta": 0.7, "same_noise": True, "window_size": 4,
                    "window_mode": "sliding", "window_shift_every": 25, "window_stride": 1}),
           {"beta": 0.0, "clip_range": 1e-4, "adv_clip_max": 5.0}),
    Preset("tempflow-grpo", TEMPFLOW,
           "TempFlow-GRPO: trajectory branching (group shares noise + ODE prefix, one Flow-GRPO SDE step at a random "
           "branching step, ODE to the end), noise-aware weighting of the policy term, PPO clip.",
           ("branch", {"num_steps": 10, "sde_type": "flow_grpo", "eta": 0.7}),
           dict(_GRPO, temporal_weight="noise", timestep_fraction=1.0)),
    Preset("branch-grpo", BRANCH,
           "BranchGRPO (as RSM reads it, App. C.2.3 Eq. 114): multi-particle zeroth-order lookahead: children branched "
           "at several steps of each trajectory, sibling-centred, full rollout (the recursive tree is not built: "
           "each branch continues by ODE).", ("ode", {"num_steps": 10, "sde_type": "flow_grpo"}),
           dict(_GRPO, branching=[0, 2, 0, 2, 0, 2, 0, 0, 0, 0], lookahead_depth=0, timestep_fraction=1.0),
           ("none", {})),
    Preset("rsm-zo", RSM,
           "RSM redesign, zeroth order (Sec. 5.2): fair clipping, branching reallocated to the early (low-SNR, "
           "semantic) steps with a short lookahead (Tweedie reward 2 steps ahead), other steps not trained.",
           ("ode", {"num_steps": 10, "sde_type": "flow_grpo"}),
           dict(_GRPO, branching=[4, 4, 4, 0, 0, 0, 0, 0, 0, 0], lookahead_depth=2, clip_mode="fair",
                timestep_fraction=1.0), ("none", {})),
    Preset("rsm-rsd", RSM,
           "RSM redesign, first order (Sec. 5.2): reward score distillation: grad r(x0) of the terminal sample at "
           "every step, lambda_t = alpha_t (the inherited alpha_t^2 low-SNR down-weighting reversed).",
           ("ode", {"num_steps": 10}),
           {"guidance": "first_order_terminal", "lambda_schedule": "alpha", "guidance_scale": 1.0,
            "trust_region": "none", "first_order_norm": "batch_rms"}, ("none", {})),
]


def preset_config(preset: Preset) -> type:
    """A subclass of RSMConfig whose field defaults are the preset's (help texts kept)."""
    fields = []
    for f in dataclasses.fields(RSMConfig):
        if f.name in preset.method_args:
            value = preset.method_args[f.name]
            default = (dataclasses.field(default_factory=lambda v=value: list(v), metadata=f.metadata)
                       if isinstance(value, list) else dataclasses.field(default=value, metadata=f.metadata))
            fields.append((f.name, f.type, default))
    cls_name = "".join(p.capitalize() for p in preset.name.replace("-", " ").split()) + "Config"
    return dataclasses.make_dataclass(cls_name, fields, bases=(RSMConfig,),
                                      namespace={"__doc__": f"RSMConfig with the {preset.name} defaults."})


def method_spec(preset: Preset) -> MethodSpec:
    est_name, est_args = preset.estimator
    sampler_name, sampler_args = preset.sampler
    return MethodSpec(name=preset.name, config_cls=preset_config(preset),
                      defaults={"sampler": sampler_name, "estimator": est_name, "replay": "fresh", "loss": "rsm"},
                      default_args={"sampler": dict(sampler_args), "estimator": dict(est_args)},
                      description=preset.description, paper=preset.reference, citation=preset.paper.bibtex)


def defaults_table() -> str:
    """Markdown: one row per preset with its components and every method_arg it changes."""
    rows = ["| preset | paper | sampler (args) | estimator | method_args changed from RSMConfig |", "|---|---|---|---|---|"]
    for p in PRESETS:
        args = ", ".join(f"`{k}={v}`" for k, v in p.method_args.items())
        rows.append(f"| `{p.name}` | {p.reference} | `{p.sampler[0]}` {p.sampler[1]} | `{p.estimator[0]}` | {args} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(defaults_table())

"""Configuration of DM-Align (``method_args`` in a recipe). Defaults from the paper / DMD2 unless noted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from trl_video.config import MethodConfig
from trl_video.config import doc_field as _f

AlignMode = Literal["none", "pair", "group"]
ALIGN_MODES = get_args(AlignMode)


@dataclass
class DMAlignConfig(MethodConfig):
    """DM-Align: ``L = dmd_weight * L_DMD + align_weight * L_align`` on a K-step generator (the policy),
    with a frozen real score model (the teacher = the base with the LoRA disabled / the frozen copy) and a
    trainable fake score model updated ``fake_updates`` times per generator update."""

    align: AlignMode = _f("group", "Alignment term: 'none' (DMD distillation alone), 'pair' (DM-PairLoss: preferred "
                             "latents from offline_latents) or 'group' (DM-GroupLoss: top-n mean of a reward-ranked "
                             "group, advantage-scaled). Paper: both variants.")
    dmd_weight: float = _f(0.5, "lambda_DMD of Eq. 8 (paper Sec. 4.1: 0.5).", ge=0.0)
    align_weight: float = _f(0.5, "lambda_align of Eq. 8 (paper Sec. 4.1: 0.5). 0 = distillation alone.", ge=0.0)
    fake_updates: int = _f(5, "N: fake-score updates per generator update (paper Sec. 3.1 / Alg. 1: 5).", ge=1)
    fake_lr: float | None = _f(None, "Learning rate of the fake score model (default: the policy's; DMD2 uses the "
                                     "same LR for generator and fake).")
    fake_lora_rank: int = _f(0, "0: the fake model is a fully trainable copy of the teacher (paper, Alg. 1 "
                                "copyWeights). >0: the copy is frozen and trains its own LoRA of this rank "
                                "(memory saver for large models; not in the paper).", ge=0)
    fake_loss: Literal["native", "x0"] = _f("native", "Fake denoising loss: 'native' (MSE on the model's own output, velocity for Wan, "
                                  "as DMD2's code and the teacher's pre-training) or 'x0' (Eq. 4 literally, "
                                  "||x0_fake(x_t) - x0||^2, i.e. native MSE weighted by sigma(t)^2).")
    fake_data: Literal["dmd_sample", "final"] = _f("dmd_sample", "What the fake model is trained on: 'dmd_sample' (Alg. 1 line 18: stopgrad(x), "
                                      "the generator's x0 prediction at the drawn step t_k) or 'final' (the full "
                                      "K-step output x_final).")
    dmd_step: Literal["random", "last"] = _f("random", "Step of the K-step schedule where the DMD gradient is taken: 'random' (Alg. 1 "
                                 "line 4: t ~ Uniform(T), one per step) or 'last'.")
    t_min: float = _f(0.02, "Smallest noise level t of F(x, t) for the DMD / align / fake losses (DMD2: 0.02 T).")
    t_max: float = _f(0.98, "Largest noise level t (DMD2: 0.98 T).")
    real_guidance_scale: float = _f(1.0, "Classifier-free guidance w on the real score, x0_real = u + w (c - u) "
                                         "with u on the empty prompt (DMD2: > 1 for text-to-image; the paper does not "
                                         "say). Set it to the CFG the teacher is sampled with (Wan2.1 5, CogVideoX 6; "
                                         "the recipes do): the student then learns the guided teacher. 1 = the "
                                         "unguided teacher.")
    normalize: bool = _f(True, "DMD2 per-sample normalisation: divide the DMD direction by mean|x - x0_real| "
                               "(the align direction by mean|x - x0_fake(F(x+))|).")
    align_norm: Literal["dmd", "none"] = _f("dmd", "Scale of the align latent gradient: 'dmd' (rescale it to the DMD gradient's batch "
                                "norm, paper Sec. 3.2 'gradient normalization ... scale compatibility with "
                                "distillation gradients') or 'none'.")
    top_n: int = _f(2, "DM-GroupLoss: x+bar = mean of the n highest-reward samples of each group (paper: 'top-n', "
                       "n not stated; our default).", ge=1)
    group_sign: Literal["paper", "flipped"] = _f("paper", "DM-GroupLoss sign in x0 form: 'paper' moves sample i along -A_i (x0_fake(F(x+bar)) "
                                  "- x0_fake(F(x_i))) (low-advantage samples towards x+bar, high-advantage ones "
                                  "beyond it: Sec. 3.2's stated behaviour, net effect = the GRPO direction sum_i A_i "
                                  "x_i); 'flipped' = +A_i (ablation: lowers the reward, see README).")
    pair_match: Literal["prompt", "random"] = _f("prompt", "DM-PairLoss: pick x+ with the same caption as the generated sample when the "
                                   "preferred set has one ('prompt', Alg. 1 line 8 sample(D_pref, c)), else or "
                                   "always ('random') any preferred latent.")

    def validate(self) -> None:
        super().validate()  # Literal choices and the bounds of the weights, fake_updates, fake_lora_rank, top_n
        self.require(0.0 < self.t_min < self.t_max < 1.0, "t_max", f"must be in (t_min, 1) with t_min > 0 "
                     f"(t_min = {self.t_min})")

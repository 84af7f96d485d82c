"""``reward_gain``: the paired gain of a reward after fine-tuning, with its standard error.

Inputs are the rewards of the same (prompt, seed) pairs: ``predictions`` after, ``references`` before. The gain is
the mean of the paired differences ``d_i = after_i - before_i``; its standard error is ``std(d) / sqrt(n)`` (sample
std with Bessel's correction), computed by ``trl_video.stats.mean_sem``.
"""

import datasets
import evaluate
import torch

from trl_video.stats import mean_sem

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions (list[float]): rewards of the fine-tuned model's samples.
    references (list[float]): rewards of the base model's samples on the same (prompt, seed) pairs.
Returns:
    before, after: mean rewards; gain: mean paired difference; gain_std, gain_sem: its sample std and standard
    error; gain_in_sem: gain / gain_sem (None when the s.e. is 0); num_pairs.
"""


class RewardGain(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}))

    def _compute(self, predictions, references):
        after = torch.tensor(predictions, dtype=torch.float64)
        before = torch.tensor(references, dtype=torch.float64)
        d = mean_sem(after - before)
        return {"before": mean_sem(before)["mean"], "after": mean_sem(after)["mean"], "gain": d["mean"],
                "gain_std": d["std"], "gain_sem": d["sem"],
                "gain_in_sem": d["mean"] / d["sem"] if d["sem"] > 0 else None, "num_pairs": len(after)}

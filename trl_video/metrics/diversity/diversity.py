"""``diversity``: mean pairwise Euclidean distance between the feature vectors of samples, over the whole set and
within each group (the samples of one prompt under different seeds; a policy collapsing onto one video per prompt
drives the within-prompt value towards 0).
"""

from typing import Any

import datasets
import evaluate
import torch

from trl_video.stats import mean_sem

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions (list[list[float]]): feature vectors, one per sample.
    references (list[str]): the group (prompt) of each sample.
Returns:
    diversity: mean distance over all pairs of samples; diversity_within: mean over groups with >= 2 samples of
    the mean distance within the group, diversity_within_sem its standard error over groups; num_groups.
"""


def _mean_pairwise(x: torch.Tensor) -> float:
    d = torch.cdist(x, x)
    n = len(x)
    return float(d.sum() / (n * (n - 1)))


class Diversity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions: list[list[float]], references: list[str]) -> dict[str, Any]:
        x = torch.tensor(predictions, dtype=torch.float64)
        groups: dict[str, list[int]] = {}
        for i, g in enumerate(references):
            groups.setdefault(g, []).append(i)
        within = [_mean_pairwise(x[idx]) for idx in groups.values() if len(idx) >= 2]
        w = mean_sem(torch.tensor(within)) if within else {"mean": None, "sem": None}
        return {"diversity": _mean_pairwise(x) if len(x) >= 2 else None, "diversity_within": w["mean"],
                "diversity_within_sem": w["sem"], "num_groups": len(within)}

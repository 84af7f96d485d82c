"""``frechet_distance``: the FID / FVD formula between Gaussian fits of two sets of feature vectors, with a
bootstrap standard error (the evaluated set resampled, the reference set fixed).

``FD = |mu_p - mu_r|^2 + Tr(S_p + S_r - 2 (S_p^1/2 S_r S_p^1/2)^1/2)``, computed by ``trl_video.stats``.
"""

import datasets
import evaluate
import torch

from trl_video.stats import bootstrap, frechet_distance

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions (list[list[float]]): feature vectors of the evaluated samples.
    references (list[list[float]]): feature vectors of the reference set (need not be paired).
    num_bootstrap (int, default 200): resamples of the evaluated set for the standard error (0: no s.e.).
    seed (int, default 0): seed of the resampling.
Returns:
    frechet_distance, frechet_distance_se.
"""


class FrechetDistance(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Sequence(datasets.Value("float64"))}))

    def _compute(self, predictions, references, num_bootstrap=200, seed=0):
        p = torch.tensor(predictions, dtype=torch.float64)
        r = torch.tensor(references, dtype=torch.float64)
        if num_bootstrap:
            bs = bootstrap(lambda x: frechet_distance(x, r), p, n=num_bootstrap, seed=seed)
            return {"frechet_distance": bs["value"], "frechet_distance_se": bs["se"]}
        return {"frechet_distance": frechet_distance(p, r), "frechet_distance_se": None}

"""Which map deserves trust: faithfulness checks of heatmap methods.

* ``perturbation.py``   -- deletion / insertion curves and their AUC
* ``similarity.py``     -- Spearman rank correlation and SSIM between maps
* ``randomization.py``  -- the cascading model randomization test
* ``road.py``           -- ROAD: remove and debias with noisy linear imputation (MoRF / LeRF)
* ``sensitivity.py``    -- max-sensitivity of a map under small input noise
* ``faithfulness.py``   -- every method scored and ranked: :func:`faithfulness`, :class:`FaithfulnessReport`
"""

from cnnvis.metrics.faithfulness import (
    FaithfulnessReport,
    FaithfulnessRow,
    faithfulness,
    heatmap_methods,
    method_explainer,
)
from cnnvis.metrics.randomization import (
    RandomizationResult,
    randomization_check,
    randomization_checks,
)
from cnnvis.metrics.road import impute, road_curves, road_score
from cnnvis.metrics.sensitivity import max_sensitivity

__all__ = [
    "FaithfulnessReport", "FaithfulnessRow", "RandomizationResult", "faithfulness", "heatmap_methods",
    "method_explainer", "randomization_check", "randomization_checks", "impute", "road_curves", "road_score",
    "max_sensitivity",
]

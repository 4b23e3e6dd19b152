"""BCLS losses, one per file with its formula in the docstring, and the compiled kernels of the Kendall term.

- ``loss_triplet_sn.py``: Triplet-SN, ``l(q,p) = τ·log(1 + Σ_n exp((α + S[q,n] − S[q,p])/τ))``;
- ``loss_kendall.py``: the Kendall ranking loss with SW-HS (sliding windows + hard-sample mining) on the
  continuous labels; ``kendall_kernels.py`` / ``openmp_team.py`` are its Numba CPU kernels and their thread team;
- ``loss_baselines.py``: VSE++'s hardest-negative hinge and CLIP's InfoNCE;
- ``false_negatives.py``: relevance-aware negatives, ``w(q, n) = 1 − clamp((R[q, n] − θ)/ramp, 0, 1)`` weights of the
  binary term's negatives (likely false negatives left out);
- ``loss_bcls.py``: ``L = L_binary + λ·L_Kendall``, each the mean of the i2t and t2i directions.

May import only torch, numpy / Numba (optional, imported on first use) and the standard library: ``save_pretrained``
copies this folder next to the weights as flat sibling files (this file as ``losses.py``), so every import here is
a ``from .<sibling> import`` of a module in this folder.
"""

from .false_negatives import negative_weights
from .loss_baselines import infonce_loss, vse_triplet_loss
from .loss_bcls import BINARY_LOSSES, OBJECTIVES, bcls_loss, resolve_objective
from .loss_kendall import kendall_ranking_loss, relevance_sort_order
from .loss_triplet_sn import triplet_sn_loss

__all__ = [
    "BINARY_LOSSES",
    "OBJECTIVES",
    "bcls_loss",
    "infonce_loss",
    "kendall_ranking_loss",
    "negative_weights",
    "relevance_sort_order",
    "resolve_objective",
    "triplet_sn_loss",
    "vse_triplet_loss",
]

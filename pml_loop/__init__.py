"""pml-loop: LoOp (optimal hard negative embeddings, ICCV 2021) for pytorch-metric-learning.

The trio users meet: :class:`LoOpLoss` (wraps any PML pair/tuple loss),
:class:`LoOpMiner`, :class:`LoOpReducer`, and the labels-aware
:class:`LoOpDistance` under them. The maths is in :mod:`pml_loop.functional`.
"""
from .distance import LoOpDistance
from .functional import loop_distance, loop_params
from .loss import LoOpLoss
from .miner import LoOpMiner
from .reducer import LoOpReducer

__version__ = "0.1.0"
__all__ = ["LoOpDistance", "LoOpLoss", "LoOpMiner", "LoOpReducer", "loop_distance", "loop_params"]

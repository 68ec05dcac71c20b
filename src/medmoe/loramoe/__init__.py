"""SparseDoctor tuner: LoRA mixture-of-experts with contrastive routing and an expert memory queue.

    from medmoe.loramoe import LoraMoeConfig, LoraMoeModel
    model = LoraMoeModel(hf_model, LoraMoeConfig(num_experts=8, top_k=2, rank=8))

See docs/loramoe.md for the equations and decisions.
"""

from medmoe.loramoe.config import LoraMoeConfig
from medmoe.loramoe.layer import LoraMoeLinear, RoutingContext
from medmoe.loramoe.model import LoraMoeModel
from medmoe.loramoe.queue import ExpertQueue

__all__ = ["ExpertQueue", "LoraMoeConfig", "LoraMoeLinear", "LoraMoeModel", "RoutingContext"]

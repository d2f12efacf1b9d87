"""foveate's learner: R-JEPA whose recurrent area is trained by exact Recurrent Forward Propagation.

Pure PyTorch; no web imports. Start with ``RFPLearner`` (rfp.py) and ``ModelConfig`` (config.py).
"""

from learner.bptt import BPTTLearner
from learner.config import ModelConfig
from learner.rfp import RFPLearner
from learner.streaming import StreamLearner, TickOutput

__all__ = ["BPTTLearner", "ModelConfig", "RFPLearner", "StreamLearner", "TickOutput"]

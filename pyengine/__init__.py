"""pyengine: fast sequence classification over ragged batches."""
from .config import EngineConfig, PoolerConfig
from .engine import LLM, EngineCore
from .outputs import (ClassificationOutput, ClassificationRequestOutput, PoolingOutput, PoolingRequestOutput,
                      ScoringOutput, ScoringRequestOutput)

__all__ = ["LLM", "EngineCore", "EngineConfig", "PoolerConfig", "ClassificationOutput",
           "ClassificationRequestOutput", "PoolingOutput", "PoolingRequestOutput", "ScoringOutput",
           "ScoringRequestOutput"]
__version__ = "0.1.0"

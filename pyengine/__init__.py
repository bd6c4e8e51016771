"""pyengine: fast sequence classification over ragged batches."""
import warnings as _warnings

# `python -m pyengine.batch` runs the batch command from the ragged-batch module, which
# this package has imported by then; runpy's warning about that is expected.
_warnings.filterwarnings("ignore", message="'pyengine.batch' found in sys.modules", category=RuntimeWarning)

from .config import EngineConfig, PoolerConfig, PoolingParams
from .engine import EngineCore
from .llm import LLM, AsyncLLM
from .lora import LoRARequest
from .outputs import (ClassificationOutput, ClassificationRequestOutput, PoolingOutput, PoolingRequestOutput,
                      ScoringOutput, ScoringRequestOutput)

__all__ = ["LLM", "AsyncLLM", "EngineCore", "EngineConfig", "PoolerConfig", "PoolingParams", "LoRARequest",
           "ClassificationOutput", "ClassificationRequestOutput", "PoolingOutput", "PoolingRequestOutput",
           "ScoringOutput", "ScoringRequestOutput"]
__version__ = "0.1.0"

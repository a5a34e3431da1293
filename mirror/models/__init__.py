from .bundled import BundledModelMissing, bundled_model_path
from .config import PRESETS, ModelConfig
from .kv_cache import KVCache
from .llama import Transformer
from .loader import LoadedModel, ModelLoadError, load_model, save_hf

__all__ = ["BundledModelMissing", "KVCache", "LoadedModel", "ModelConfig", "ModelLoadError", "PRESETS",
           "Transformer", "bundled_model_path", "load_model", "save_hf"]

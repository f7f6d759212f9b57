"""SoLA model side: the edited layer, key sources, adapter training and the SolaEditor API."""
from .config import EditConfig, RuntimeConfig, TrainConfig
from .editor import SolaEditor
from .models import load_model

__all__ = ["SolaEditor", "EditConfig", "RuntimeConfig", "TrainConfig", "load_model"]

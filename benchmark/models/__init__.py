"""Models: what exists and what it needs (`catalog`, no torch), how one is built (`factory`), and
the encoders behind the FoundationModel interface (`base`, `clip`, `efficientnet`)."""
from .catalog import CHECKPOINT_SUFFIXES, OFFLINE_MODELS, check_model, default_image_size

__all__ = ["CHECKPOINT_SUFFIXES", "OFFLINE_MODELS", "check_model", "default_image_size"]

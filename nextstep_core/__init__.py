"""NextStep-1 / 1.1 inference engine: plain PyTorch, no ComfyUI import."""

from .errors import NextStepError

__all__ = ["NextStepError"]

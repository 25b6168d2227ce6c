"""Dovetail inference: load a target and a trained draft, decode speculatively, evaluate.

from dovetail_infer import Dovetail, load_target
"""

from dovetail_infer.checkpoint import load_draft
from dovetail_infer.engine import Dovetail, GenerationResult, InferConfig
from dovetail_infer.models.target import load_target
from dovetail_infer.text import ChatResult

__all__ = ["ChatResult", "Dovetail", "GenerationResult", "InferConfig", "load_draft", "load_target"]

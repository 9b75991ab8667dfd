"""Hugging Face Hub: `hf://` locations, errors turned into one-line messages, model cards."""

from .card import adapter_card
from .client import HF_SCHEME, hub_call, parse_location, resolve_location

__all__ = ["HF_SCHEME", "adapter_card", "hub_call", "parse_location", "resolve_location"]

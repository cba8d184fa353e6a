"""Checkpoint formats: writing the real layouts (and, later, converting and requantising)."""

from inhouse.convert.writer import LAYOUTS, write_checkpoint
from inhouse.convert.random_init import random_tensors, write_random_checkpoint

__all__ = ["LAYOUTS", "random_tensors", "write_checkpoint", "write_random_checkpoint"]

"""What the commands share: consoles, the error decorator, option types, opening an engine."""

from __future__ import annotations

import functools
import os
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from inhouse.errors import InhouseError

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


class DType(str, Enum):
    bfloat16 = "bfloat16"
    float32 = "float32"

    @property
    def torch(self):
        import torch
        return {"bfloat16": torch.bfloat16, "float32": torch.float32}[self.value]


class Effort(str, Enum):
    low = "low"
    medium = "medium"
    high = "high"


def cli_errors(fn):
    """Turn errors into one line: `InhouseError` as is (exit 1), anything else as an internal
    error (exit 2; INHOUSE_DEBUG=1 re-raises for the traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except InhouseError as e:
            err.print(f"error: {e}", markup=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - the CLI must not show a traceback
            if os.environ.get("INHOUSE_DEBUG"):
                raise
            err.print(f"internal error: {type(e).__name__}: {e} (set INHOUSE_DEBUG=1 for the "
                      "traceback)", markup=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def open_engine(model: Path | None, dtype: DType, quiet: bool = False, mmap: bool = False):
    """Load a model (or the demo checkpoint) into an `AsyncEngine`; returns (client, label).
    mmap: keep the weights memory-mapped (load_model)."""
    from inhouse.config import EngineConfig
    from inhouse.convert.demo import demo_model
    from inhouse.engine import AsyncEngine, LLMEngine
    from inhouse.model import find_checkpoint, load_model

    label = str(model)
    if model is None:
        model, label = demo_model()
        dtype = DType.float32
    find_checkpoint(model)  # a bad path fails here, before anything is announced
    if not quiet:
        err.print(f"[dim]loading {label} ...[/dim]")
    loaded = load_model(model, dtype=dtype.torch, mmap=mmap)
    from inhouse.harmony.grammar import GrammarBackend

    return AsyncEngine(LLMEngine(loaded, EngineConfig(), grammars=GrammarBackend())), label

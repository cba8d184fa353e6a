"""`inhouse finetune`: LoRA fine-tuning on local JSONL data, with a progress bar."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from inhouse.cli.common import DType, cli_errors, out


@cli_errors
def finetune(
    model: Annotated[Path, typer.Option(help="Base checkpoint directory (HF or original/ layout).")],
    data: Annotated[Path, typer.Option(help="Training conversations, JSONL (chat or Responses shape).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where the adapter (PEFT format) goes.")],
    eval_data: Annotated[Path | None, typer.Option("--eval", help="Held-out conversations, JSONL.")] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 16,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (the update is scaled by alpha / r).")] = 32.0,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 2e-4,
    epochs: Annotated[int, typer.Option(help="Passes over the training data.")] = 1,
    batch_tokens: Annotated[int, typer.Option(help="Tokens per optimiser step (whole conversations).")] = 8192,
    max_len: Annotated[int, typer.Option(help="Longest rendered conversation allowed, in tokens.")] = 4096,
    targets: Annotated[str, typer.Option(help="What gets LoRA: attn, experts or both (comma-separated).")] = "attn,experts",
    warmup_ratio: Annotated[float, typer.Option(help="Share of steps spent warming up.")] = 0.05,
    eval_every: Annotated[int, typer.Option(help="Eval every N steps (0: each epoch's end).")] = 0,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: each epoch's end).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the adapter's initialisation and the shuffling.")] = 0,
    dtype: Annotated[DType, typer.Option(help="Compute dtype of the frozen base.")] = DType.float32,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute layers in backward (less memory).")] = True,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in --out.")] = False,
) -> None:
    """Fine-tune a LoRA adapter on local conversations; the base model stays frozen (and packed)."""
    from inhouse.train import TrainConfig, finetune as run

    config = TrainConfig(rank=rank, alpha=alpha, lr=lr, epochs=epochs, batch_tokens=batch_tokens,
                         max_len=max_len, targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
                         warmup_ratio=warmup_ratio, eval_every=eval_every, save_every=save_every,
                         seed=seed, dtype=dtype.value, gradient_checkpointing=gradient_checkpointing)
    columns = (TextColumn("[bold]finetune"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}  eval {task.fields[eval]}  {task.fields[tps]} tok/s"),
               TimeRemainingColumn())
    progress = Progress(*columns, console=out)  # started at the first step: data errors come first
    task = progress.add_task("train", total=None, loss="-", eval="-", tps="-")

    def on_step(info) -> None:
        progress.start()
        fields = {"loss": f"{info.loss:.4f}", "tps": f"{info.tokens_per_s:.0f}"}
        if info.eval_loss is not None:
            fields["eval"] = f"{info.eval_loss:.4f}"
        progress.update(task, completed=info.step, total=info.total_steps, **fields)

    try:
        result = run(model, data, out_dir, config, eval_path=eval_data, resume=resume,
                     on_step=on_step)
    finally:
        progress.stop()
    evals = result.eval_losses
    summary = f"adapter written to {result.out_dir} after {result.steps} steps"
    if result.train_loss is not None:
        summary += f"; last train loss {result.train_loss:.4f}"
    if evals:
        summary += f"; eval loss {evals[0][1]:.4f} -> {evals[-1][1]:.4f}"
    out.print(summary)

"""LoRA fine-tuning: frozen base (packed MXFP4 experts stay packed), AdamW, linear warmup then
cosine decay, gradient checkpointing, periodic eval loss, checkpoints and resume.

The loss is the mean cross-entropy over the target tokens of a batch (see harmony/training.py
for which tokens are targets); the unembedding runs only at the positions that predict them.
A batch is a set of whole sequences up to `batch_tokens` tokens; gradients accumulate sequence
by sequence, so memory is that of the longest sequence, not of the batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from inhouse.errors import ConfigError
from inhouse.harmony.training import TrainingSequence
from inhouse.model import load_model
from inhouse.model import lora
from inhouse.model.digest import checkpoint_digest
from inhouse.model.peft_format import load_adapter, save_adapter
from inhouse.train.data import DataError, load_examples, render_examples

ADAPTER = "train"
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
SUMMARY_FILE = "inhouse_training.json"


@dataclass(frozen=True)
class TrainConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("attn", "experts")
    lr: float = 2e-4
    epochs: int = 1
    batch_tokens: int = 8192
    max_len: int = 4096
    warmup_ratio: float = 0.05  # of all steps, at least one step
    min_lr_ratio: float = 0.1  # the cosine ends at lr * this
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 0  # steps; 0: at the end of each epoch
    save_every: int = 0  # steps; 0: at the end of each epoch
    seed: int = 0
    gradient_checkpointing: bool = True
    dtype: str = "float32"

    def __post_init__(self) -> None:
        try:
            lora.LoraSpec(self.rank, self.alpha, self.targets)  # validates rank and targets
        except ValueError as e:
            raise ConfigError(str(e)) from None
        checks = [(self.lr > 0, "--lr must be positive"), (self.epochs >= 1, "--epochs must be >= 1"),
                  (self.batch_tokens >= 1, "--batch-tokens must be >= 1"),
                  (self.max_len >= 2, "--max-len must be >= 2"),
                  (self.dtype in ("float32", "bfloat16"), "--dtype must be float32 or bfloat16")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def spec(self) -> lora.LoraSpec:
        return lora.LoraSpec(self.rank, self.alpha, self.targets)


@dataclass
class StepInfo:
    """What the trainer reports after each optimiser step (and after each eval)."""

    step: int
    total_steps: int
    epoch: int
    loss: float | None
    lr: float
    tokens_per_s: float
    eval_loss: float | None = None


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    train_loss: float | None
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)


def finetune(model_path: str | Path, train_path: str | Path, out_dir: str | Path,
             config: TrainConfig = TrainConfig(), eval_path: str | Path | None = None,
             resume: bool = False, on_step: Callable[[StepInfo], None] | None = None) -> TrainResult:
    """Fine-tune a LoRA adapter; writes it (PEFT format) into `out_dir`.

    Everything is validated before `out_dir` is created, so bad data leaves nothing behind; a
    run that fails before its first checkpoint removes the directory it created.
    """
    out_dir = Path(out_dir)
    train = render_examples(load_examples(train_path), train_path, config.max_len)
    evals = (render_examples(load_examples(eval_path), eval_path, config.max_len)
             if eval_path else [])
    _check_out_dir(out_dir, resume)
    model = load_model(model_path, dtype=getattr(torch, config.dtype))
    created = not out_dir.exists()
    try:
        return _run(model, model_path, train, evals, out_dir, config, resume, on_step,
                    _data_digest(train_path))
    except BaseException:
        if created and not (out_dir / CHECKPOINTS).exists():
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _check_out_dir(out_dir: Path, resume: bool) -> None:
    if resume:
        if not _latest_checkpoint(out_dir):
            raise DataError(f"--resume: no checkpoint in {out_dir / CHECKPOINTS}")
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir} is not empty: choose another --out, or --resume a run")


def _run(model, model_path, train, evals, out_dir, cfg, resume, on_step, data_digest) -> TrainResult:
    lora.add_adapter(model, ADAPTER, cfg.spec, seed=cfg.seed)
    model.lora_routing.default = ADAPTER
    model.gradient_checkpointing = cfg.gradient_checkpointing
    params = lora.adapter_parameters(model, ADAPTER)
    for p in params:
        p.requires_grad_(True)
    batches = [b for epoch in range(cfg.epochs) for b in make_batches(train, cfg.batch_tokens,
                                                                      cfg.seed + epoch, epoch)]
    total = len(batches)
    epoch_ends = {i + 1 for i, (e, _) in enumerate(batches) if i + 1 == total or batches[i + 1][0] != e}
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(total, cfg))
    result = TrainResult(out_dir, 0, None)
    step = 0
    if resume:
        step = _restore(model, opt, sched, _latest_checkpoint(out_dir), result)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0, tokens = time.perf_counter(), 0
    for step in range(step + 1, total + 1):
        epoch, batch = batches[step - 1]
        model.train()
        opt.zero_grad(set_to_none=True)
        num_targets = sum(s.num_targets for s in batch)
        loss_sum = 0.0
        for seq in batch:
            loss = sequence_loss(model, seq)
            (loss / num_targets).backward()
            loss_sum += loss.item()
            tokens += len(seq.ids)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        result.steps, result.train_loss = step, loss_sum / num_targets
        info = StepInfo(step, total, epoch, result.train_loss, sched.get_last_lr()[0],
                        tokens / max(time.perf_counter() - t0, 1e-9))
        at_epoch_end = step in epoch_ends
        if evals and ((cfg.eval_every and step % cfg.eval_every == 0) or at_epoch_end):
            info.eval_loss = evaluate(model, evals)
            result.eval_losses.append((step, info.eval_loss))
        if (cfg.save_every and step % cfg.save_every == 0) or at_epoch_end:
            _save_checkpoint(model, opt, sched, out_dir, step, cfg, result)
        if on_step:
            on_step(info)
    save_adapter(out_dir, cfg.spec, lora.adapter_tensors(model, ADAPTER), str(model_path))
    summary = {"base_model": str(model_path), "base_model_digest": checkpoint_digest(model.source),
               "train_data_digest": data_digest, "config": asdict(cfg), "steps": result.steps,
               "train_loss": result.train_loss, "eval_losses": result.eval_losses,
               "train_sequences": len(train), "train_target_tokens": sum(s.num_targets for s in train)}
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return result


def sequence_loss(model, seq: TrainingSequence) -> torch.Tensor:
    """Summed cross-entropy of the sequence's target tokens (each predicted from the ones before)."""
    ids = torch.tensor(seq.ids, dtype=torch.long)
    targets = torch.tensor([t for t in range(1, len(seq.ids)) if seq.mask[t]], dtype=torch.long)
    if targets.numel() == 0:
        return torch.zeros((), requires_grad=torch.is_grad_enabled())
    h = model.hidden_states(ids[:-1])  # (T-1, H): row t predicts token t+1
    logits = model.lm_head(h[(targets - 1).to(h.device)]).float()  # (n, V)
    return torch.nn.functional.cross_entropy(logits, ids[targets].to(logits.device), reduction="sum")


@torch.no_grad()
def evaluate(model, seqs: list[TrainingSequence]) -> float:
    """Mean cross-entropy per target token."""
    model.eval()
    total = sum(sequence_loss(model, s).item() for s in seqs)
    return total / max(1, sum(s.num_targets for s in seqs))


def make_batches(seqs: list[TrainingSequence], batch_tokens: int, seed: int,
                 epoch: int) -> list[tuple[int, list[TrainingSequence]]]:
    """Shuffle (seeded per epoch) and pack whole sequences up to `batch_tokens` tokens."""
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed)).tolist()
    batches: list[tuple[int, list[TrainingSequence]]] = []
    current: list[TrainingSequence] = []
    size = 0
    for i in order:
        s = seqs[i]
        if current and size + len(s.ids) > batch_tokens:
            batches.append((epoch, current))
            current, size = [], 0
        current.append(s)
        size += len(s.ids)
    if current:
        batches.append((epoch, current))
    return batches


def lr_schedule(total: int, cfg: TrainConfig) -> Callable[[int], float]:
    warmup = max(1, round(cfg.warmup_ratio * total))

    def factor(step: int) -> float:  # step: optimiser steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return factor


def _save_checkpoint(model, opt, sched, out_dir: Path, step: int, cfg: TrainConfig,
                     result: TrainResult, keep: int = 2) -> None:
    root = out_dir / CHECKPOINTS
    path = root / f"step-{step:06d}"
    save_adapter(path, cfg.spec, lora.adapter_tensors(model, ADAPTER))
    torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "train_loss": result.train_loss, "eval_losses": result.eval_losses},
               path / (STATE_FILE + ".tmp"))
    (path / (STATE_FILE + ".tmp")).replace(path / STATE_FILE)
    for old in sorted(p for p in root.iterdir() if p.name.startswith("step-"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _latest_checkpoint(out_dir: Path) -> Path | None:
    root = out_dir / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def _restore(model, opt, sched, path: Path, result: TrainResult) -> int:
    _, tensors = load_adapter(path)
    current = lora.adapter_tensors(model, ADAPTER)
    with torch.no_grad():
        for name, t in tensors.items():
            current[name].copy_(t)
    state = torch.load(path / STATE_FILE, weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    result.steps, result.train_loss = state["step"], state["train_loss"]
    result.eval_losses = [tuple(x) for x in state["eval_losses"]]
    return state["step"]


def _data_digest(path: str | Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()

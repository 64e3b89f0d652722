"""The training loop: AdamW, linear warm-up + cosine decay, gradient clipping, optional bf16 autocast.

Any ``nn.Module`` that maps ``input_ids [B, T]`` to ``logits [B, T, V]`` can be trained on any task. The
loss is the cross-entropy at the scored positions only (``TaskBatch.mask``); a model whose ``forward``
accepts ``logits_at`` (positions ``[B, P]``, as ``HybridLM`` does) computes logits only there, which for
MQAR (a few scored positions, vocabularies of thousands) skips most of the output layer. A model with an
``aux_loss`` tensor after its forward (``HybridLM``: MoE load balancing, DSA indexer KL, already weighted) has
it added to the loss.

Determinism: batch ``i`` is drawn from the task with a seed derived from ``(config.seed, i)``, the model and
optimizer are restored from a checkpoint with RNG states, and the learning rate is a pure function of the
step, so a run resumed from a checkpoint continues exactly as an uninterrupted run would. Under
``torchrun`` the same loop runs data-parallel (see :mod:`hybridattn.train.distributed`).

Shape legend: B batch, T sequence length, V vocabulary, S scored positions in a batch.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hybridattn.ops._checks import check_positive_int
from hybridattn.tasks.base import Task, TaskBatch
from hybridattn.train import checkpoint as ckpt
from hybridattn.train.distributed import DistInfo, all_reduce_sum, barrier, local_slice, unwrap, wrap_model

#: eval examples come from this seed of the eval split for every run, so all models see the same ones
EVAL_SEED = 0

#: TrainConfig fields that may differ between a checkpoint and the run resuming it: they do not change what is
#: trained (when to evaluate or save, the progress bar)
RESUME_SAFE_FIELDS = frozenset({"eval_every", "checkpoint_every", "progress", "eval_examples", "eval_batch_size"})


@dataclass
class TrainConfig:
    """Optimisation settings (all steps counted in optimizer steps)."""

    steps: int = 1000
    batch_size: int = 32               # global batch (split over processes under torchrun)
    lr: float = 1e-3                   # peak learning rate
    min_lr_ratio: float = 0.1          # final lr = lr * min_lr_ratio (cosine floor)
    warmup_steps: int = 50             # linear warm-up from 0
    weight_decay: float = 0.1          # AdamW, on matrices only (not norms, biases)
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0             # max global gradient norm; 0 = no clipping
    bf16: bool = False                 # autocast the forward to bfloat16
    seed: int = 0                      # data order (and model init, by whoever builds the model)
    eval_examples: int = 256           # held-out examples for `evaluate`
    eval_batch_size: int = 64
    eval_every: int = 0                # evaluate every N steps during training (0 = only at the end)
    checkpoint_every: int = 0          # write a checkpoint every N steps (0 = never; needs checkpoint_dir)
    stop_accuracy: float | None = None  # end the run at the first periodic evaluation this accurate (needs
                                        # eval_every): the same rule for every model of a comparison
    progress: bool = True              # rich progress bar (main process only)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for name in ("steps", "batch_size", "eval_examples", "eval_batch_size"):
            check_positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
            check_positive_int(name, getattr(self, name), allow_zero=True)
        if not self.lr > 0:
            raise ValueError(f"lr: expected a float > 0, received {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: expected a float in [0, 1], received {self.min_lr_ratio}")
        if self.stop_accuracy is not None:
            if isinstance(self.stop_accuracy, bool) or not isinstance(self.stop_accuracy, (int, float)) or not (
                    0 < self.stop_accuracy <= 1):
                raise ValueError(f"stop_accuracy: expected None or a float in (0, 1], received {self.stop_accuracy!r}")
            if not self.eval_every:
                raise ValueError("stop_accuracy: expected eval_every > 0 (the evaluations it stops at), received "
                                 "eval_every=0")


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine to the floor."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_seed(seed: int, step: int) -> int:
    """The task seed of training batch ``step`` of a run seeded ``seed``."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def _accepts_logits_at(model: nn.Module) -> bool:
    try:
        return "logits_at" in inspect.signature(unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return False


def scored_logits(model: nn.Module, batch: TaskBatch) -> torch.Tensor:
    """Logits at the scored positions, ``[S, V]`` in row-major order of ``batch.mask``.

    When every row has the same number ``P`` of scored positions (true of every built-in task) and the model
    accepts ``logits_at``, only those ``[B, P]`` positions go through the output layer.
    """
    counts = batch.mask.sum(1)
    if _accepts_logits_at(model) and bool((counts == counts[0]).all()):
        positions = batch.mask.nonzero()[:, 1].view(batch.mask.shape[0], -1)       # (B, P), sorted per row
        logits = model(batch.inputs, logits_at=positions)                          # (B, P, V)
        return logits.reshape(-1, logits.shape[-1])
    return model(batch.inputs)[batch.mask]


def model_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The model's weighted auxiliary loss of its last forward (``HybridLM.aux_loss``: MoE load balancing, DSA
    indexer KL), or None for a model without one."""
    aux = getattr(unwrap(model), "aux_loss", None)
    return aux if isinstance(aux, torch.Tensor) else None


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # decay matrices (linear/embedding weights) only, as GPT-2/nanoGPT do; norms, biases and gates keep their scale
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class TrainResult:
    """What a run produced: per-step history, final held-out metrics, throughput."""

    history: list[dict] = field(default_factory=list)   # one entry per step: step, loss, accuracy, lr
    evals: list[dict] = field(default_factory=list)     # step, loss, accuracy
    final: dict = field(default_factory=dict)           # loss, accuracy on the eval split
    tokens_per_s: float = 0.0                           # training tokens (inputs) per second, this run
    resumed_from: int = 0
    stopped_early: bool = False                         # ended at config.stop_accuracy before config.steps


class Trainer:
    """Train ``model`` on ``task``.

    Args:
        model: maps int64 ``[B, T]`` to logits ``[B, T, V]`` (optionally accepting ``logits_at``).
        task: any :class:`~hybridattn.tasks.base.Task`.
        config: a :class:`TrainConfig`.
        checkpoint_dir: where checkpoints go and where a run resumes from (None: no checkpoints).
        dist: the process's place in a ``torchrun`` job (default: a single process).
        step_callback: called as ``fn(step, record)`` after each step (on every process).
        allow_changed: ``TrainConfig`` field names that may differ from the checkpoint's when resuming (e.g.
            ``("steps",)`` to train a finished run further); others refuse.

    Raises:
        ValueError: ``checkpoint_every`` without a ``checkpoint_dir``; a batch not divisible by processes; an
            unknown name in ``allow_changed``.
    """

    def __init__(self, model: nn.Module, task: Task, config: TrainConfig, *, checkpoint_dir=None,
                 dist: DistInfo | None = None, step_callback: Callable[[int, dict], None] | None = None,
                 allow_changed: tuple[str, ...] = ()):
        if config.checkpoint_every and checkpoint_dir is None:
            raise ValueError("checkpoint_dir: expected a directory when checkpoint_every > 0, received None")
        model_vocab = getattr(getattr(unwrap(model), "config", None), "vocab_size", None)
        if isinstance(model_vocab, int) and model_vocab < task.vocab_size:
            raise ValueError(f"task: its vocabulary has {task.vocab_size} tokens but the model's has {model_vocab}; "
                             f"build the model with vocab_size={task.vocab_size} (or >=)")
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(allow_changed) - fields)
        if unknown:
            raise ValueError(f"allow_changed: expected TrainConfig field names, received {unknown}")
        self.allow_changed = frozenset(allow_changed)
        self.dist = dist or DistInfo()
        self.local = local_slice(config.batch_size, self.dist)
        self.model = model
        self.ddp_model = wrap_model(model, self.dist)
        self.task, self.config, self.checkpoint_dir = task, config, checkpoint_dir
        self.step_callback = step_callback
        self.device = next(model.parameters()).device
        self.optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr,
                                           betas=config.betas)
        self.result = TrainResult()
        self.step = 0

    # -- one step ---------------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def train_step(self) -> dict:
        """One optimizer step on the batch of the current data position; returns its record."""
        cfg = self.config
        full = self.task.sample(cfg.batch_size, seed=batch_seed(cfg.seed, self.step))
        total_scored = int(full.mask.sum())
        batch = full.slice(self.local.start, self.local.stop).to(self.device)
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.ddp_model.train()
        with self._autocast():
            logits = scored_logits(self.ddp_model, batch)                          # (S, V)
        targets = batch.targets[batch.mask]
        loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
        # global-mean loss; the world-size factor undoes DDP's gradient averaging (see distributed.py)
        loss = loss_sum * (self.dist.world_size / max(1, total_scored))
        aux = model_aux_loss(self.model)
        if aux is not None:
            # already a mean over this rank's tokens (ranks hold equal slices): DDP's averaging of gradients makes
            # it the mean over ranks, so it takes no world-size factor
            loss = loss + aux.float()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                     if cfg.grad_clip > 0 else torch.tensor(float("nan")))
        self.optimizer.step()
        correct = (logits.argmax(-1) == targets).sum()
        aux_value = torch.zeros((), device=loss_sum.device) if aux is None else aux.detach().float()
        stats = all_reduce_sum(torch.stack([loss_sum.detach().float(), correct.float(), aux_value]), self.dist)
        self.step += 1
        record = {"step": self.step, "loss": float(stats[0]) / max(1, total_scored),
                  "accuracy": float(stats[1]) / max(1, total_scored), "lr": lr, "grad_norm": float(grad_norm)}
        if aux is not None:
            record["aux_loss"] = float(stats[2]) / self.dist.world_size  # weighted, mean over ranks
        return record

    # -- evaluation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, num_examples: int | None = None) -> dict:
        """Mean loss and accuracy over the scored positions of ``num_examples`` held-out examples."""
        return evaluate(self.model, self.task, num_examples or self.config.eval_examples,
                        batch_size=self.config.eval_batch_size, bf16=self.config.bf16)

    # -- checkpoints -----------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"config": dataclasses.asdict(self.config), "history": self.result.history,
                "evals": self.result.evals, "lr": lr_at(max(0, self.step - 1), self.config)}

    def save(self) -> None:
        if self.dist.is_main:
            ckpt.save_checkpoint(self.checkpoint_dir, model=self.model, optimizer=self.optimizer,
                                 step=self.step, state=self._state())
        barrier(self.dist)

    def _check_resumed_config(self, state: dict) -> None:
        """Refuse to continue a run under other settings than it was written with (two runs mixed in one)."""
        saved = state.get("config") or {}
        current = dataclasses.asdict(self.config)
        differ = {}
        for name, value in current.items():
            old = saved.get(name, value)
            old = tuple(old) if isinstance(old, list) else old
            if old != value and name not in RESUME_SAFE_FIELDS and name not in self.allow_changed:
                differ[name] = (old, value)
        if differ:
            listed = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in differ.items())
            raise ValueError(f"checkpoint_dir: {self.checkpoint_dir} holds a run with other settings ({listed}); "
                             f"resume it with its own settings, start in another directory, or pass "
                             f"allow_changed={tuple(differ)!r} to continue under the new ones")

    def resume(self) -> bool:
        """Load the latest checkpoint of ``checkpoint_dir`` that verifies, if there is one; True when resumed.

        Raises:
            ValueError: the checkpoint was written under another ``TrainConfig`` (the differences are listed;
                fields in ``allow_changed`` and those that do not change the run, ``RESUME_SAFE_FIELDS``, may
                differ).
        """
        if self.checkpoint_dir is None:
            return False
        state = ckpt.load_checkpoint(self.checkpoint_dir, model=self.model, optimizer=self.optimizer,
                                     check_state=self._check_resumed_config)
        if state is None:
            return False
        self.step = state["step"]
        self.result.history, self.result.evals = state["history"], state["evals"]
        self.result.resumed_from = self.step
        return True

    # -- the loop --------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to ``config.steps`` (resuming from ``checkpoint_dir`` when it holds a checkpoint)."""
        cfg = self.config
        torch.manual_seed(cfg.seed)   # dropout and any sampling in the model; a resume restores the saved state
        self.resume()
        tokens = train_time = 0.0
        with _progress(cfg.progress and self.dist.is_main, cfg.steps, self.step) as bar:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                record = self.train_step()
                train_time += time.perf_counter() - t0
                tokens += cfg.batch_size * self.task.seq_len
                record["tokens_per_s"] = tokens / train_time
                self.result.history.append(record)
                bar(record)
                if self.step_callback is not None:
                    self.step_callback(self.step, record)
                stop = False
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self.result.evals.append({"step": self.step, **self.evaluate()})
                    stop = cfg.stop_accuracy is not None and self.result.evals[-1]["accuracy"] >= cfg.stop_accuracy
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save()
                if stop:
                    self.result.stopped_early = True
                    break
        self.result.tokens_per_s = tokens / train_time if train_time else 0.0
        if self.result.evals and self.result.evals[-1]["step"] == self.step:
            self.result.final = {k: v for k, v in self.result.evals[-1].items() if k != "step"}
        else:
            self.result.final = self.evaluate()
            self.result.evals.append({"step": self.step, **self.result.final})
        return self.result


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, num_examples: int, *, batch_size: int = 64, bf16: bool = False) -> dict:
    """Loss (mean nats per scored token) and accuracy of ``model`` on ``num_examples`` held-out examples.

    The examples are the eval split of ``task`` at seed ``EVAL_SEED``, the same for every model and run.
    """
    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    data = task.sample(num_examples, seed=EVAL_SEED, split="eval")
    loss = correct = count = 0.0
    for start in range(0, num_examples, batch_size):
        batch = data.slice(start, start + batch_size).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = scored_logits(model, batch).float()
        targets = batch.targets[batch.mask]
        loss += float(F.cross_entropy(logits, targets, reduction="sum"))
        correct += float((logits.argmax(-1) == targets).sum())
        count += targets.numel()
    model.train(was_training)
    return {"loss": loss / max(1, count), "accuracy": correct / max(1, count), "scored": int(count)}


class _progress:
    """A rich progress bar showing loss, accuracy and tokens/s, or nothing when disabled."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.enabled, self.total, self.start = enabled, total, start

    def __enter__(self):
        if not self.enabled:
            return lambda record: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=True)
        self.progress.start()
        task_id = self.progress.add_task("train", total=self.total, completed=self.start, info="")

        def update(record: dict) -> None:
            info = (f"loss {record['loss']:.3f}  acc {record['accuracy']:.3f}  "
                    f"{record['tokens_per_s']:,.0f} tok/s")
            self.progress.update(task_id, completed=record["step"], info=info)

        return update

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.stop()
        return False

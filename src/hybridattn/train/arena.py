"""The arena: train several mechanisms and hybrids on the same tasks under the same budget, and compare.

A sweep is ``tasks x models x widths x seeds``. Every run trains a fresh ``HybridLM`` with the same
:class:`~hybridattn.train.trainer.TrainConfig`, evaluates it on the same held-out examples, and records
parameters, accuracy and loss (bits per byte on text), training tokens/s, learning curve; once per
``(task, model, width)`` the inference costs are measured (prefill and per-token decode latency at a few
context lengths, cache bytes — KV + state — at the evaluation length, peak memory; see
:mod:`hybridattn.train.arena_measure`).

Models are ``ModelConfig`` overrides, so every mixer in the registry takes part by name::

    {"label": "attention", "hybrid": "0:1"}
    {"label": "gdn 3:1", "hybrid": "3:1", "linear_mixer": "gated_deltanet"}

Presets: ``smoke`` (seconds, for tests), ``quick`` (the README's first command: MQAR with more key-value
pairs than a linear layer's state holds), ``full`` (every registered linear mixer, pure and 3:1, over
widths, zoology-style), or a TOML file with the same keys as :class:`ArenaConfig` (see the README).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hybridattn.bench.measure import default_device
from hybridattn.models.checkpoint import write_text_atomic
from hybridattn.tasks import build_task
from hybridattn.tasks.text import bits_per_byte
from hybridattn.train.arena_measure import measure_inference
from hybridattn.train.trainer import TrainConfig, Trainer


@dataclass
class ArenaConfig:
    """A sweep. ``tasks``: ``{"name": ..., **task options}``; ``models``: ``{"label": ..., **ModelConfig
    overrides}``; ``model``: ModelConfig fields shared by every model (``d_model`` comes from ``widths``,
    ``vocab_size`` from the task; a model's nested tables such as ``linear`` update the shared ones key by key);
    ``train``: TrainConfig fields; ``thesis``: optional labels of the roles :func:`check_thesis` checks
    (``task``, ``full``, ``large``, ``small``, ``linear``, ``hybrid``)."""

    name: str = "custom"
    tasks: list[dict] = field(default_factory=lambda: [{"name": "mqar"}])
    models: list[dict] = field(default_factory=lambda: [{"label": "attention", "hybrid": "0:1"}])
    model: dict = field(default_factory=dict)
    widths: list[int] = field(default_factory=lambda: [64])
    seeds: int = 1
    train: dict = field(default_factory=dict)
    contexts: list[int] = field(default_factory=lambda: [256, 1024])
    repeats: int = 3                   # timing repeats (medians)
    threads: int | None = None         # torch CPU threads for the whole sweep (None: leave as is)
    device: str | None = None          # None: CUDA when available, else the CPU
    thesis: dict | None = None
    save_models: bool = True           # save seed 0's model of each (task, model, width) for `viz attention`
    jobs: int = 1                      # training runs at a time, in worker processes (CPU)
    capacity: bool = False             # add the training-free memory-capacity panel (tasks.capacity)
    target_bpb: float | None = None    # text: report the training tokens each model needs to reach this held-out bpb
    notes: str = ""                    # why these settings: shown in report.html, kept in results.json

    def __post_init__(self) -> None:
        for name in ("tasks", "models"):
            items = getattr(self, name)
            if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
                raise ValueError(f"{name}: expected a non-empty list of tables, received {items!r}")
        for i, t in enumerate(self.tasks):
            if "name" not in t:
                raise ValueError(f"tasks[{i}]: expected a 'name' key, received {sorted(t)}")
        if not self.widths or not all(isinstance(w, int) and w > 0 for w in self.widths):
            raise ValueError(f"widths: expected a non-empty list of positive ints, received {self.widths!r}")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds: expected an int >= 1, received {self.seeds!r}")
        if isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1:
            raise ValueError(f"jobs: expected an int >= 1, received {self.jobs!r}")
        TrainConfig(**self.train)  # validate early, with TrainConfig's messages

    def total_runs(self) -> int:
        return len(self.tasks) * len(self.models) * len(self.widths) * self.seeds

    @classmethod
    def from_toml(cls, path) -> "ArenaConfig":
        """Read a sweep from a TOML file whose top-level keys are this class's fields."""
        import tomllib

        data = tomllib.loads(Path(path).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown arena key in {path}; expected one of {sorted(names)}")
        return cls(**data)


def model_label(spec: dict) -> str:
    """A model's label: its ``label`` key, else ``mixer ratio`` from its overrides."""
    if "label" in spec:
        return spec["label"]
    return f"{spec.get('linear_mixer', 'gated_deltanet')} {spec.get('hybrid', spec.get('pattern', '3:1'))}"


def build_model(spec: dict, *, base: dict, width: int, vocab_size: int):
    """A ``HybridLM`` from a model spec (label dropped), shared options ``base``, ``width`` and vocabulary."""
    from hybridattn.models import HybridLM, ModelConfig

    options = dict(base)
    for key, value in spec.items():  # a nested table (linear, attention, ...) updates the shared one
        if key != "label":
            options[key] = {**options[key], **value} if isinstance(value, dict) and isinstance(
                options.get(key), dict) else value
    options.update(d_model=width, vocab_size=vocab_size)
    return HybridLM(ModelConfig(**options))


def _ratio(spec: dict, model) -> str:
    types = model.config.layer_types
    from hybridattn.layers.registry import is_softmax_mixer

    soft = sum(is_softmax_mixer(t) for t in types)
    return f"{len(types) - soft}:{soft}"


def _task(spec: dict):
    """The task of a ``{"name": ..., **options}`` table."""
    return build_task(spec["name"], **{k: v for k, v in spec.items() if k != "name"})


def _train_one(job: dict) -> dict:
    """One training run (a worker process's unit of work, or called in process): build the task and the model,
    train, evaluate, save the model when asked. Returns the run's record without its inference costs."""
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    task_spec, spec = job["task"], job["spec"]
    task = _task(task_spec)
    torch.manual_seed(job["seed"])
    model = build_model(spec, base=job["base"], width=job["width"], vocab_size=task.vocab_size).to(job["device"])
    train_cfg = TrainConfig(**{**job["train"], "seed": job["seed"], "progress": job["progress"]})
    t0 = time.perf_counter()
    result = Trainer(model, task, train_cfg).fit()
    record = {
        "task": task.name, "model": model_label(spec), "width": job["width"], "seed": job["seed"],
        "ratio": _ratio(spec, model), "layer_types": list(model.config.layer_types),
        "params": model.num_parameters(), "accuracy": result.final["accuracy"], "loss": result.final["loss"],
        "tokens_per_s": result.tokens_per_s, "train_seconds": time.perf_counter() - t0,
        "steps": result.history[-1]["step"] if result.history else 0, "stopped_early": result.stopped_early,
        "tokens_per_step": train_cfg.batch_size * task.seq_len,
        "curve": [{"step": r["step"], "loss": r["loss"], "accuracy": r["accuracy"]} for r in result.history],
        "evals": result.evals,
    }
    if task.name == "text":
        record["bits_per_byte"] = bits_per_byte(result.final["loss"])
    if job["save"]:
        model.save_pretrained(job["save"])
    return record


def run_arena(config: ArenaConfig, out_dir, *, progress: bool = True, log=print) -> dict:
    """Run the sweep, write ``results.json`` (and models) into ``out_dir``, and return the results.

    Training runs are independent: with ``config.jobs > 1`` they run in that many worker processes, each with
    ``threads // jobs`` torch threads (small models train faster as two one-thread processes than as one
    two-thread one). Inference costs are measured afterwards, one model at a time, in this process.

    Returns:
        ``{"config": ..., "runs": [per-run records], "summary": [per (task, model, width) aggregates],
        "thesis": [...] | None, "environment": {...}}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = config.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    device = default_device(config.device)
    jobs_n = 1 if device.type != "cpu" else max(1, min(config.jobs, config.total_runs()))
    jobs = []
    for task_spec in config.tasks:
        for spec in config.models:
            for width in config.widths:
                for seed in range(config.seeds):
                    save = None
                    if seed == 0 and config.save_models:
                        save = str(out_dir / "models" / _slug(task_spec["name"], model_label(spec), width))
                    jobs.append({"task": task_spec, "spec": spec, "base": config.model, "width": width, "seed": seed,
                                 "train": config.train, "device": str(device), "save": save,
                                 "threads": threads // jobs_n if jobs_n > 1 else 0,
                                 "progress": progress and jobs_n == 1})
    estimate = estimate_seconds(config, device=device, threads=threads // jobs_n if jobs_n > 1 else threads)
    steps = config.train.get("steps", TrainConfig.steps)
    log(f"[arena] {len(jobs)} runs ({len(config.tasks)} tasks x {len(config.models)} models x {len(config.widths)} "
        f"widths x {config.seeds} seeds), up to {steps:,} steps each, {jobs_n} at a time: at most about "
        f"{f'{estimate:.0f} s' if estimate < 120 else f'{estimate / 60:.0f} min'} of training from a few timed steps"
        f"{' (runs that reach stop_accuracy end sooner)' if config.train.get('stop_accuracy') else ''}")
    started = time.perf_counter()
    runs = _run_jobs(jobs, jobs_n, progress=progress, log=log)
    train_wall = time.perf_counter() - started
    measured = {}
    for job, record in zip(jobs, runs):
        key = (record["task"], record["model"], record["width"])
        if key not in measured:
            task = _task(job["task"])
            torch.manual_seed(0)
            model = build_model(job["spec"], base=config.model, width=job["width"], vocab_size=task.vocab_size)
            log(f"[arena] costs: {record['model']} d={record['width']} (contexts up to {max(config.contexts):,})")
            measured[key] = measure_inference(model.to(device), vocab_size=task.vocab_size,
                                              contexts=config.contexts, eval_len=task.seq_len,
                                              repeats=config.repeats)
        record["inference"] = measured[key]
    results = {
        "config": dataclasses.asdict(config), "runs": runs, "summary": summarize(runs),
        "environment": {"torch": torch.__version__, "threads": threads, "jobs": jobs_n, "device": str(device),
                        "train_wall_seconds": train_wall, "wall_seconds": time.perf_counter() - started},
    }
    results["thesis"] = check_thesis(results["summary"], config.thesis) if config.thesis else None
    if config.target_bpb is not None:
        add_tokens_to_target(results, config.target_bpb)
    if config.capacity:
        from hybridattn.tasks.capacity import capacity_curves

        log("[arena] memory capacity panel (no training)")
        results["capacity"] = capacity_curves()
    write_text_atomic(out_dir / "results.json", json.dumps(results, indent=1))
    return results


def estimate_seconds(config: ArenaConfig, *, device, threads: int, timed_steps: int = 3) -> float:
    """Wall seconds the sweep's training takes at most: a few timed steps of each (task, model) at the first width,
    times the step budget and the seeds, over the jobs running at once."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    total = 0.0
    try:
        for task_spec in config.tasks:
            task = _task(task_spec)
            for spec in config.models:
                torch.manual_seed(0)
                model = build_model(spec, base=config.model, width=config.widths[0], vocab_size=task.vocab_size)
                train = {k: v for k, v in config.train.items() if k not in ("stop_accuracy", "eval_every")}
                trainer = Trainer(model.to(device), task, TrainConfig(**{**train, "progress": False}))
                trainer.train_step()  # warm-up: first-call allocations and kernel loads
                start = time.perf_counter()
                for _ in range(timed_steps):
                    trainer.train_step()
                per_step = (time.perf_counter() - start) / timed_steps
                total += per_step * trainer.config.steps * config.seeds * len(config.widths)
    finally:
        torch.set_num_threads(torch_threads)
    jobs = 1 if default_device(config.device).type != "cpu" else max(1, min(config.jobs, config.total_runs()))
    return total / jobs


def _run_jobs(jobs: list[dict], workers: int, *, progress: bool, log) -> list[dict]:
    """Every job's record, in the order of ``jobs``; a progress bar of runs with the time left."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.progress import TimeRemainingColumn

    def done(record) -> None:
        log(f"[arena] {record['task']} | {record['model']} | d={record['width']} | seed {record['seed']}: "
            f"accuracy {record['accuracy']:.3f}, loss {record['loss']:.3f}, {record['steps']} steps"
            f"{' (stopped at the target accuracy)' if record['stopped_early'] else ''}, "
            f"{record['train_seconds']:.0f} s")

    if workers == 1:
        records = []
        for i, job in enumerate(jobs):
            log(f"[arena] run {i + 1}/{len(jobs)}: {job['task']['name']} | {model_label(job['spec'])} | "
                f"d={job['width']} | seed {job['seed']}")
            records.append(_train_one(job))
            done(records[-1])
        return records
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    records: list[dict | None] = [None] * len(jobs)
    bar = Progress(TextColumn("[bold]arena"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"),
                   TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), transient=True,
                   disable=not progress)
    with bar, ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        task_id = bar.add_task("runs", total=len(jobs))
        futures = {pool.submit(_train_one, job): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            records[futures[future]] = future.result()
            done(records[futures[future]])
            bar.advance(task_id)
    return records


def _slug(*parts) -> str:
    return "-".join(str(p).replace(" ", "_").replace(":", "-") for p in parts)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict]) -> list[dict]:
    """One row per ``(task, model, width)``: mean and standard deviation over seeds, min and max."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["model"], r["width"]), []).append(r)
    rows = []
    for (task, model, width), rs in groups.items():
        acc_mean, acc_std = _mean_std([r["accuracy"] for r in rs])
        loss_mean, _ = _mean_std([r["loss"] for r in rs])
        inf = rs[0]["inference"]
        rows.append({
            "task": task, "model": model, "width": width, "ratio": rs[0]["ratio"], "seeds": len(rs),
            "params": rs[0]["params"], "accuracy_mean": acc_mean, "accuracy_std": acc_std,
            "accuracy_min": min(r["accuracy"] for r in rs), "accuracy_max": max(r["accuracy"] for r in rs),
            "loss_mean": loss_mean, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
            "cache_bytes_eval": inf["cache_bytes_eval"], "peak_memory_bytes": inf["peak_memory_bytes"],
            "decode_s": inf["decode_s"], "decode_q1_s": inf.get("decode_q1_s"), "decode_q3_s": inf.get("decode_q3_s"),
            "prefill_s": inf["prefill_s"], "contexts": inf["contexts"], "steps_mean": statistics.fmean(
                r.get("steps", 0) for r in rs),
            "cache_bytes": inf["cache_bytes"],
            **({"bits_per_byte": bits_per_byte(loss_mean)} if task == "text" else {}),
        })
    return rows


def add_tokens_to_target(results: dict, target_bpb: float) -> None:
    """Set each text summary row's ``tokens_to_target``: the training tokens at the first periodic evaluation whose
    held-out bits per byte is at most ``target_bpb`` (mean over the seeds that reach it; None when none does),
    and ``seeds_at_target``."""
    for row in results["summary"]:
        if row["task"] != "text":
            continue
        reached = []
        for r in results["runs"]:
            if (r["task"], r["model"], r["width"]) != (row["task"], row["model"], row["width"]):
                continue
            steps = [e["step"] for e in r.get("evals", []) if bits_per_byte(e["loss"]) <= target_bpb]
            if steps:
                reached.append(steps[0] * r["tokens_per_step"])
        row["target_bpb"] = target_bpb
        row["tokens_to_target"] = statistics.fmean(reached) if reached else None
        row["seeds_at_target"] = len(reached)


#: what each thesis role is checked against (means over seeds, at each width); see :func:`check_thesis`
THESIS_GOALS = {"full": 0.95, "large": 0.90, "small_gap": 0.20, "linear_gap": 0.20, "hybrid_gap": 0.03}


def check_thesis(summary: list[dict], thesis: dict) -> list[dict]:
    """The recall thesis on ``thesis["task"]`` at each width, from the labels ``thesis`` names:

    - ``full`` (softmax attention): accuracy >= 0.95;
    - ``large`` (a linear mixer whose state holds the K pairs): accuracy >= 0.90, so the linear model can learn
      the task;
    - ``small`` (the same mixer with a state that cannot hold them): >= 0.20 below ``large``;
    - ``linear`` (a pure linear model, when there is no large / small pair): >= 0.20 below ``full``;
    - ``hybrid`` (3:1, built from the small-state layers): within 0.03 of ``full``.

    A check whose roles are absent is skipped. ``thesis["expected"] = False`` marks checks that the budget is not
    meant to pass (the smoke preset): they are reported as "not expected to pass" instead of MISS.
    """
    out = []
    by = {(r["task"], r["model"], r["width"]): r for r in summary}
    expected = thesis.get("expected", True)
    goals = THESIS_GOALS
    for width in sorted({r["width"] for r in summary}):
        acc = {role: by[(thesis["task"], thesis[role], width)]["accuracy_mean"]
               for role in ("full", "large", "small", "linear", "hybrid")
               if role in thesis and (thesis["task"], thesis[role], width) in by}
        if "full" not in acc:
            continue
        checks = [(f"{thesis['full']} accuracy", f">= {goals['full']}", acc["full"], acc["full"] >= goals["full"])]
        if "large" in acc:
            checks.append((f"{thesis['large']} accuracy", f">= {goals['large']}",
                           acc["large"], acc["large"] >= goals["large"]))
        if "large" in acc and "small" in acc:
            gap = acc["large"] - acc["small"]
            checks.append((f"{thesis['large']} - {thesis['small']}", f">= {goals['small_gap']}", gap,
                           gap >= goals["small_gap"]))
        if "linear" in acc:
            gap = acc["full"] - acc["linear"]
            checks.append((f"{thesis['full']} - {thesis['linear']}", f">= {goals['linear_gap']}", gap,
                           gap >= goals["linear_gap"]))
        if "hybrid" in acc:
            gap = acc["full"] - acc["hybrid"]
            checks.append((f"{thesis['full']} - {thesis['hybrid']}", f"<= {goals['hybrid_gap']}", gap,
                           gap <= goals["hybrid_gap"]))
        out += [{"width": width, "name": name, "goal": goal, "measured": value, "passed": bool(ok),
                 "expected": expected} for name, goal, value, ok in checks]
    return out


def thesis_mark(row: dict) -> str:
    """PASS, MISS, or "not expected to pass" for a check the budget is not meant to pass."""
    if row["passed"]:
        return "PASS"
    return "MISS" if row.get("expected", True) else "not expected to pass at this budget"


def print_summary(results: dict, *, console=None) -> None:
    """The results in the terminal, readable at 80 columns: one table of what was learned, one of what it
    costs, then the thesis checks."""
    from rich.console import Console
    from rich.table import Table

    from hybridattn.bench.measure import format_bytes

    console = console or Console()
    summary = results["summary"]
    several = len({r["task"] for r in summary}) > 1 or len({r["width"] for r in summary}) > 1

    def name(r):  # task and width only when the sweep has several of them
        return f"{r['model']} ({r['task']}, d={r['width']})" if several else r["model"]

    learned = Table(title=f"arena {results['config']['name']}: accuracy on held-out examples", title_justify="left")
    for col, justify in (("model", "left"), ("L:S", "right"), ("accuracy ± sd (seeds)", "right"),
                         ("steps", "right"), ("loss", "right"), ("tok/s", "right")):
        learned.add_column(col, justify=justify, overflow="fold")
    for r in summary:
        loss = f"{r['bits_per_byte']:.3f} bpb" if "bits_per_byte" in r else f"{r['loss_mean']:.3f}"
        learned.add_row(name(r), r["ratio"], f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} ({r['seeds']})",
                        f"{r.get('steps_mean', 0):,.0f}", loss, f"{r['tokens_per_s']:,.0f}")
    context = summary[0]["contexts"][-1]
    costs = Table(title="inference costs", title_justify="left")
    for col, justify in (("model", "left"), ("params", "right"), (f"decode ms @{context:,}", "right"),
                         ("cache @ eval", "right"), ("peak mem", "right")):
        costs.add_column(col, justify=justify, overflow="fold")
    for r in summary:
        cache = "-" if r["cache_bytes_eval"] is None else format_bytes(r["cache_bytes_eval"])
        costs.add_row(name(r), f"{r['params']:,}", f"{r['decode_s'][-1] * 1e3:.2f}", cache,
                      format_bytes(r["peak_memory_bytes"]))
    console.print(learned)
    for r in summary:
        if "tokens_to_target" in r:
            reached = ("not reached" if r["tokens_to_target"] is None else
                       f"{r['tokens_to_target']:,.0f} training tokens ({r['seeds_at_target']} of {r['seeds']} seeds)")
            console.print(f"{name(r)}: held-out {r['target_bpb']} bpb {reached}")
    console.print(costs)
    colour = {"PASS": "green", "MISS": "red"}
    for row in results.get("thesis") or []:
        mark = thesis_mark(row)
        shown = f"[{colour[mark]}]{mark}[/{colour[mark]}]" if mark in colour else mark
        width = f" d={row['width']}" if several else ""
        console.print(f"thesis{width}: {row['name']} = {row['measured']:.3f} ({row['goal']}) {shown}")


# The presets live in their own module; ``preset`` and ``PRESETS`` are part of this one's interface.
from hybridattn.train.arena_presets import PRESETS, preset  # noqa: E402,F401

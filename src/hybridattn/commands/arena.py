"""``hybridattn arena``: train mechanisms and hybrids on the same tasks, compare recall against cost."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

HELP = "train softmax, linear and hybrid models on the same tasks and compare recall against cost"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="quick", choices=("smoke", "quick", "text", "full"),
                        help="smoke: seconds (tests); quick: MQAR, softmax vs large- and small-state gated DeltaNet "
                             "vs 3:1, 3 seeds (~16 min on 2 CPU cores); text: byte-level learning curves (~30 min); full: "
                             "sweep over mechanisms and state sizes")
    parser.add_argument("--config", metavar="FILE.toml", help="a TOML sweep (keys of ArenaConfig); overrides --preset")
    parser.add_argument("--out", metavar="DIR", default=None, help="output directory (default: arena-<preset>)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds per configuration")
    parser.add_argument("--steps", type=int, default=None, help="override the training steps of every run")
    parser.add_argument("--data", metavar="PATH", default=None,
                        help="your text (a file or a directory) for the byte-level 'text' task instead of the stdlib")
    parser.add_argument("--device", default=None, help="torch device (default: CUDA when available, else CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from hybridattn.train.arena import ArenaConfig, preset, print_summary, run_arena
    from hybridattn.train.arena_report import write_report
    from hybridattn.viz.arena_plots import plot_all

    config = ArenaConfig.from_toml(args.config) if args.config else preset(args.preset)
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit(f"--seeds: expected an int >= 1, received {args.seeds}")
        config.seeds = args.seeds
    if args.data is not None:
        config.tasks = [{**t, "data": args.data} if t["name"] == "text" else t for t in config.tasks]
    if args.device is not None:
        config.device = args.device
    if args.steps is not None:
        config.train = {**config.train, "steps": args.steps}
        config.__post_init__()
    out = args.out or f"arena-{config.name}"
    results = run_arena(config, out, progress=not args.no_progress)
    if config.name == "full":
        from hybridattn.models.checkpoint import write_text_atomic
        from hybridattn.train.arena_presets import ordering_report

        results["ordering"] = ordering_report(results["summary"])
        write_text_atomic(f"{out}/results.json", json.dumps(results, indent=1))
    pngs = plot_all(results, out)
    command = "hybridattn " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    report = write_report(results, pngs, f"{out}/report.html", command=command)
    print_summary(results)
    for line in results.get("ordering", []):
        print(f"ordering: {line}")
    print(f"wrote {out}/results.json, {report} and {len(pngs)} PNGs")
    return 0

"""Train a ``HybridLM`` preset on a task, on one process or data-parallel under ``torchrun``::

    python -m hybridattn.train --task mqar --task-option num_kv_pairs=32 --preset qwen3-next-tiny --steps 500
    torchrun --nproc_per_node=2 -m hybridattn.train --task text --preset gpt-tiny --checkpoint-dir runs/text
    hybridattn generate --model runs/text --prompt "def " --tokenizer bytes

A run with ``--checkpoint-dir`` resumes from the latest checkpoint there. The final model is saved with
``save_pretrained`` into ``<checkpoint-dir>/final`` (or ``--save``), and ``hybridattn generate --model
<checkpoint-dir>`` loads it. The run ends with a one-line summary and a JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridattn.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="mqar", help="a registered task (mqar, copying, ..., text)")
    parser.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                        help="task option (JSON value), e.g. num_kv_pairs=32; repeatable")
    parser.add_argument("--data", metavar="PATH", default=None, help="text file or directory for --task text")
    parser.add_argument("--preset", default="qwen3-next-tiny", help="a ModelConfig preset")
    parser.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                        help="ModelConfig override (JSON value), e.g. hybrid=\"7:1\"; repeatable")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--save", default=None, help="directory for the final model")
    parser.add_argument("--allow-changed", action="append", default=[], metavar="FIELD",
                        help="resume a checkpoint although this TrainConfig field differs (e.g. steps); repeatable")
    args = parser.parse_args(argv)

    from hybridattn.models import HybridLM, ModelConfig
    from hybridattn.tasks import build_task
    from hybridattn.tasks.text import bits_per_byte
    from hybridattn.train import TrainConfig, Trainer, init_distributed
    from hybridattn.train.distributed import shutdown

    pairs = lambda items: {k: _value(v) for k, v in (i.split("=", 1) for i in items)}  # noqa: E731
    task_options = pairs(args.task_option)
    if args.data is not None:
        task_options["data"] = args.data
    task = build_task(args.task, **task_options)
    info = init_distributed()
    torch.manual_seed(args.seed)
    config = ModelConfig.preset(args.preset, vocab_size=task.vocab_size, **pairs(args.model_option))
    model = HybridLM(config)
    if info.device is not None:
        model = model.to(info.device)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, bf16=args.bf16,
                        checkpoint_every=args.checkpoint_every if args.checkpoint_dir else 0)
    result = Trainer(model, task, train, checkpoint_dir=args.checkpoint_dir, dist=info,
                     allow_changed=tuple(args.allow_changed)).fit()
    if info.is_main:
        save = args.save or (f"{args.checkpoint_dir}/final" if args.checkpoint_dir else None)
        if save:
            model.save_pretrained(save)
        final = result.final
        quality = (f"{bits_per_byte(final['loss']):.3f} bits per byte" if task.name == "text"
                   else f"accuracy {final['accuracy']:.3f}")
        print(f"trained {train.steps} steps: held-out loss {final['loss']:.3f} nats, {quality}, "
              f"{result.tokens_per_s:,.0f} tokens/s; " + (f"model saved to {save} (hybridattn generate --model "
                                                           f"{save})" if save else "model not saved (no --save)"))
        print(json.dumps({"final": final, "tokens_per_s": result.tokens_per_s, "saved": save}))
    shutdown(info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

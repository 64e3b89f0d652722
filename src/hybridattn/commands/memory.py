"""``hybridattn memory``: parameters and cache memory of a model at a context length, per layer kind, vs the
same model with softmax attention in every layer."""

from __future__ import annotations

HELP = "Plan the memory of a hybrid model: parameters, KV cache, recurrent state, conv tails at a context length."

DTYPES = ("bfloat16", "float16", "float32", "float64")


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="qwen3-next-80b",
                        help="a ModelConfig preset (qwen3-next-80b, qwen3-next-tiny, gpt-tiny, ...)")
    parser.add_argument("--config", default=None, help="a config.json (overrides --preset)")
    parser.add_argument("--context", type=int, default=262_144, help="tokens held in the caches")
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="dtype of weights, KV and conv tails")


def run(args) -> int:
    import torch

    from hybridattn.models.config import ModelConfig
    from hybridattn.models.memory import plan, print_plan

    config = ModelConfig.from_json(args.config) if args.config else ModelConfig.preset(args.preset)
    p = plan(config, args.context, args.batch, getattr(torch, args.dtype))
    print_plan(p, title=args.config or args.preset)
    return 0

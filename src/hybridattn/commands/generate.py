"""``hybridattn generate --model DIR --prompt TEXT``: load a checkpoint (hybridattn's own format or a
transformers-format Qwen3-Next directory), tokenize the prompt and stream the continuation to stdout.

Tokenization uses the directory's ``tokenizer.json`` through the optional ``tokenizers`` library
(``pip install "hybridattn[tokenizers]"``); ``--tokenizer bytes`` uses UTF-8 bytes as token ids for byte-level
models (vocabulary 256) that ship no tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "generate text from a checkpoint directory, streaming tokens as they come"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (hybridattn or transformers Qwen3-Next)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", choices=("auto", "bytes"), default="auto",
                        help="auto: DIR/tokenizer.json via the tokenizers library; bytes: UTF-8 bytes as ids")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")


class ByteTokenizer:
    """UTF-8 bytes as token ids (for models with a 256-entry vocabulary)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` read from ``tokenizer.json``."""

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise RuntimeError(
                "generate: reading tokenizer.json needs the optional `tokenizers` library; install it with "
                "`pip install tokenizers` (or `pip install \"hybridattn[tokenizers]\"`)"
            ) from err
        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(model_dir: Path, kind: str = "auto"):
    """The tokenizer for ``model_dir``: ``tokenizer.json`` (``kind="auto"``) or UTF-8 bytes (``"bytes"``).

    Raises:
        FileNotFoundError: ``kind="auto"`` and the directory has no ``tokenizer.json``.
        RuntimeError: the ``tokenizers`` library is not installed.
    """
    if kind == "bytes":
        return ByteTokenizer()
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"--model: expected a tokenizer.json in {model_dir}, found none; pass --tokenizer bytes for a "
            "byte-level model"
        )
    return HFTokenizer(path)


def stop_tokens(model_dir: Path, model) -> list[int]:
    """End-of-sequence ids: ``generation_config.json``'s ``eos_token_id`` (int or list) when present, else the
    model config's."""
    ids = None
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        ids = json.loads(gen.read_text()).get("eos_token_id")
    if ids is None:
        ids = getattr(model.config, "eos_token_id", None)
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


def stream_text(tokenizer, token_steps, out, *, prompt_ids=()) -> list[int]:
    """Write the decoded prompt, then the text of ``token_steps`` (an iterable of new token ids, ints or
    1-element tensors) to ``out`` as it grows; returns the new ids.

    The prompt and the continuation are decoded together and only the new suffix is written each step, because
    one character can span several tokens (byte-level BPE) and word-level tokenizers put the separators in
    ``decode``.
    """
    ids: list[int] = list(prompt_ids)
    shown = tokenizer.decode(ids) if ids else ""
    out.write(shown)
    for step in token_steps:
        ids.extend(int(i) for i in (step.reshape(-1).tolist() if hasattr(step, "reshape") else [step]))
        text = tokenizer.decode(ids)
        # A trailing replacement character is usually half a multi-byte character: wait for the rest.
        if text.endswith("\ufffd") or not text.startswith(shown):
            continue
        out.write(text[len(shown):])
        out.flush()
        shown = text
    text = tokenizer.decode(ids)
    if text.startswith(shown):
        out.write(text[len(shown):])
    out.write("\n")
    out.flush()
    return ids[len(prompt_ids):]


def run(args: argparse.Namespace) -> int:
    import torch

    from hybridattn.models import HybridLM

    model_dir = Path(args.model)
    try:
        tokenizer = load_tokenizer(model_dir, args.tokenizer)
    except (FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    model = HybridLM.from_pretrained(model_dir).to(getattr(torch, args.dtype)).eval()
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        print("error: --prompt: expected text that tokenizes to at least one token, received an empty prompt",
              file=sys.stderr)
        return 2
    input_ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        steps = model.generate(input_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, stop=stop_tokens(model_dir, model) or None,
                               stream=True)
        stream_text(tokenizer, steps, sys.stdout, prompt_ids=prompt)
    return 0

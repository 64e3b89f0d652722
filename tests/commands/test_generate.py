import io
import json
import sys

import pytest
import torch

from hybridattn.cli import main
from hybridattn.commands.generate import ByteTokenizer, stop_tokens, stream_text
from hybridattn.models import HybridLM, ModelConfig

WORDS = ["[UNK]", "hello", "world", "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away",
         "quick", "fox"]


def _tiny(vocab_size):
    return HybridLM(ModelConfig(vocab_size=vocab_size, d_model=32, num_layers=2, layers=["gated_deltanet", "attention"],
                                attention=dict(num_heads=2), linear=dict(num_heads=2))).eval()


def _word_tokenizer(path):
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizer path needs the optional tokenizers library")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return tok


def _expected(model, tok, prompt, n):
    ids = torch.tensor([tok.encode(prompt).ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, temperature=0.0)[0].tolist()
    return tok.decode(out) + "\n"


def test_generate_streams_the_greedy_continuation(tmp_path, capsys):
    model = _tiny(len(WORDS))
    model.save_pretrained(tmp_path)
    tok = _word_tokenizer(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "the cat sat", "--max-new-tokens", "7"]) == 0
    out = capsys.readouterr().out
    assert out == _expected(model, tok, "the cat sat", 7)
    assert len(out.split()) == 3 + 7


@pytest.mark.needs_transformers
def test_generate_from_a_transformers_qwen3_next_directory(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers", reason="builds the checkpoint with transformers")
    from transformers import Qwen3NextConfig

    from hybridattn.bench.qwen3_next import transformers_without_fla

    module = transformers_without_fla(monkeypatch.setattr)
    hf = module.Qwen3NextForCausalLM(Qwen3NextConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        layer_types=["linear_attention", "full_attention"],
        num_key_value_heads=1, head_dim=16, linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, num_experts=3, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, initializer_range=0.2))
    hf.save_pretrained(tmp_path)
    tok = _word_tokenizer(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hello world", "--max-new-tokens", "5"]) == 0
    ids = torch.tensor([tok.encode("hello world").ids])
    want = hf.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)[0].tolist()
    assert capsys.readouterr().out == tok.decode(want) + "\n"


def test_missing_tokenizer_json_is_a_clear_error(tmp_path, capsys):
    _tiny(len(WORDS)).save_pretrained(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "expected a tokenizer.json in" in err and "--tokenizer bytes" in err


def test_tokenizers_library_absent_is_a_clear_error(tmp_path, capsys, monkeypatch):
    _tiny(len(WORDS)).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "pip install tokenizers" in capsys.readouterr().err


def test_byte_tokenizer_and_multibyte_characters_split_over_steps(tmp_path, capsys):
    model = _tiny(256)
    model.save_pretrained(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "ab", "--max-new-tokens", "4",
                 "--tokenizer", "bytes"]) == 0
    with torch.no_grad():
        new = model.generate(torch.tensor([[97, 98]]), max_new_tokens=4, temperature=0.0)[0, 2:].tolist()
    assert capsys.readouterr().out == "ab" + ByteTokenizer().decode(new) + "\n"
    # "é" is two UTF-8 bytes: the half character is held back, never printed as a replacement character
    out = io.StringIO()
    stream_text(ByteTokenizer(), [torch.tensor([0xC3]), torch.tensor([0xA9]), torch.tensor([0x21])], out)
    assert out.getvalue() == "é!\n"


def test_stop_tokens_from_generation_config(tmp_path):
    model = _tiny(len(WORDS))
    assert stop_tokens(tmp_path, model) == []
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 7]}))
    assert stop_tokens(tmp_path, model) == [3, 7]


def test_cli_errors_are_one_line_with_a_hint_not_a_traceback(tmp_path, capsys):
    from hybridattn.cli import main

    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi", "--tokenizer", "bytes"]) == 2
    err = capsys.readouterr().err
    assert "hybridattn generate: error: directory: expected config.json" in err and "Traceback" not in err
    assert "--debug" in err
    with pytest.raises(FileNotFoundError):
        main(["--debug", "generate", "--model", str(tmp_path / "missing"), "--prompt", "hi", "--tokenizer", "bytes"])

"""Linformer and LSH mixers: why the registry marks them non-causal (an output moves when a later token changes),
constructor validation, config fields they cannot honour, and the registry's own argument checks."""

import pytest
import torch

from hybridattn.layers import registry
from hybridattn.layers.registry import build_mixer, is_causal_mixer, mixer_entry
from hybridattn.layers.whole_sequence_attention import LinformerAttention, LSHAttention
from hybridattn.models import ModelConfig


@pytest.mark.parametrize("mixer", [
    LinformerAttention(32, 4, max_len=32, proj_len=8),
    LSHAttention(32, 4, n_buckets=4, n_hashes=2, causal=True),
], ids=["linformer", "lsh-causal"])
def test_a_later_token_moves_earlier_outputs_which_is_why_they_are_registered_non_causal(mixer):
    torch.manual_seed(0)
    mixer = mixer.double()
    x = torch.randn(1, 32, 32, dtype=torch.float64)
    changed = x.clone()
    changed[:, -1] = -x[:, -1]  # for LSH: the opposite direction lands in another bucket in every round
    with torch.no_grad():
        moved = (mixer(changed)[:, :-1] - mixer(x)[:, :-1]).abs().amax(-1)  # (1, 31)
    assert int((moved > 1e-9).sum()) >= 16  # most earlier positions, not a rounding effect
    assert not is_causal_mixer("linformer") and not is_causal_mixer("lsh")


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(n_buckets=3), ValueError, "n_buckets: expected 1 or an even number"),
    (dict(n_buckets=0), ValueError, "n_buckets"),
    (dict(n_buckets="a"), TypeError, "n_buckets"),
    (dict(n_hashes=0), ValueError, "n_hashes"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(causal="yes"), TypeError, "causal: expected a bool"),
])
def test_lsh_arguments_fail_at_construction(kwargs, err, match):
    with pytest.raises(err, match=match):
        LSHAttention(32, 4, **kwargs)


def test_one_bucket_is_accepted():
    assert LSHAttention(32, 4, n_buckets=1).n_buckets == 1


def _config(name, **attention):
    return ModelConfig(d_model=48, num_layers=1, layers=[name], attention=dict(num_heads=4, **attention))


@pytest.mark.parametrize("name", ["linformer", "lsh"])
@pytest.mark.parametrize("field,value", [
    ("head_dim", 16), ("position", "alibi"), ("position", "t5"), ("partial_rotary_factor", 0.5),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}), ("qk_norm", True), ("output_gate", True),
])
def test_attention_fields_they_cannot_honour_are_refused(name, field, value):
    with pytest.raises(ValueError, match=rf"attention\.{field}: mixer '{name}' does not support it"):
        build_mixer(name, _config(name, **{field: value}), 0)


@pytest.mark.parametrize("name", ["linformer", "lsh"])
def test_neutral_values_build(name):
    # the defaults, "none" positions and a head_dim equal to d_model // num_heads change nothing for them
    build_mixer(name, _config(name, position="none", head_dim=12), 0)


def test_registry_arguments_are_checked():
    with pytest.raises(TypeError, match="causal: expected a bool"):
        registry.register_mixer("test_bad_flag", causal="no")
    with pytest.raises(TypeError, match="options: expected an iterable of str"):
        registry.register_mixer("test_bad_options", options="window")
    assert mixer_entry("lsh").options == ("n_buckets", "n_hashes", "seed", "allow_duplicates")
    assert mixer_entry("attention").options == () and mixer_entry("attention").causal

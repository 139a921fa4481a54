import json

import pytest
import torch
from conftest import transformers

from qwen3_kernels import PRESETS, QWEN, Config
from qwen3_kernels.config import rope_frequencies

# The published config.json values of each dense Qwen3 release.
PUBLISHED = {
    "0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 tie_word_embeddings=True),
    "1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 tie_word_embeddings=True),
    "4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
               tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               tie_word_embeddings=False),
    "14B": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
                tie_word_embeddings=False),
    "32B": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                tie_word_embeddings=False),
}
SHARED = dict(model_type="qwen3", vocab_size=151936, num_key_value_heads=8, head_dim=128,
              max_position_embeddings=40960, rope_theta=1000000, rms_norm_eps=1e-06, torch_dtype="bfloat16",
              hidden_act="silu", attention_bias=False, use_sliding_window=False, rope_scaling=None)


def _published_json(tmp_path, size, **changes):
    data = {**SHARED, **PUBLISHED[size], **changes}
    (tmp_path / "config.json").write_text(json.dumps(data))
    return tmp_path


def test_default_is_qwen3_0_6b():
    c = Config()
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == \
        (151936, 1024, 28, 16, 8, 128)
    assert (c.intermediate_size, c.max_position_embeddings, c.rope_theta, c.rms_norm_eps) == \
        (3072, 40960, 1e6, 1e-6)
    assert c.tie_word_embeddings and c.rope_scaling is None


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_presets_equal_the_published_config_json(tmp_path, size):
    parsed = Config.from_pretrained(_published_json(tmp_path, size))
    assert Config.preset(size) == parsed == PRESETS[size]
    assert Config.preset(f"Qwen3-{size}") == parsed


def test_unknown_preset_names_the_choices():
    with pytest.raises(KeyError, match="unknown Qwen3 preset '3B'.*0.6B"):
        Config.preset("3B")


def test_parameter_count_of_0_6b_matches_transformers():
    hf_config = transformers.Qwen3Config(**{k: v for k, v in {**SHARED, **PUBLISHED["0.6B"]}.items()
                                            if k not in ("model_type", "torch_dtype", "rope_theta", "rope_scaling")})
    with torch.device("meta"):
        hf = transformers.Qwen3ForCausalLM(hf_config)
        model = QWEN()
    hf_unique = sum(p.numel() for p in hf.parameters())
    assert sum(p.numel() for p in model.parameters()) == hf_unique == 596_049_920
    # The seed's snippet: parameters without the (tied) embedding/LM head.
    snippet = sum(p.numel() for p in model.parameters()) - model.embeddings.weight.numel()
    assert snippet == hf_unique - hf.model.embed_tokens.weight.numel()
    assert model.lm_head.weight is model.embeddings.weight


def test_new_transformers_spelling(tmp_path):
    data = {**SHARED, **PUBLISHED["4B"], "dtype": "bfloat16", "rope_parameters": {"rope_type": "default",
                                                                                    "rope_theta": 5000000.0}}
    for key in ("rope_theta", "torch_dtype", "rope_scaling"):
        data.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(data))
    c = Config.from_pretrained(tmp_path)
    assert c.rope_theta == 5e6 and c.dtype == "bfloat16" and c.torch_dtype == torch.bfloat16


def test_rope_base_is_read_from_the_file(tmp_path):
    c = Config.from_pretrained(_published_json(tmp_path, "4B", rope_theta=5000000))
    assert c.rope_theta == 5e6
    inv_freq, scale = rope_frequencies(c)
    assert scale == 1.0
    assert torch.allclose(inv_freq[1].double(), torch.tensor(5e6, dtype=torch.float64) ** (-2 / 128))


def test_yarn_frequencies_and_scaling_match_transformers(tmp_path):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    c = Config.from_pretrained(_published_json(tmp_path, "8B", rope_scaling=yarn, max_position_embeddings=131072))
    hf_config = transformers.Qwen3Config(**{k: v for k, v in {**SHARED, **PUBLISHED["8B"]}.items()
                                            if k not in ("model_type", "torch_dtype", "rope_theta", "rope_scaling")},
                                         rope_parameters={**yarn, "rope_theta": 1e6})
    hf_config.max_position_embeddings = 131072
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf_inv_freq, hf_scale = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    inv_freq, scale = rope_frequencies(c)
    assert torch.equal(inv_freq, hf_inv_freq)
    assert scale == pytest.approx(hf_scale) and scale == pytest.approx(0.1 * torch.tensor(4.0).log().item() + 1)


@pytest.mark.parametrize("size", ["0.6B", "8B"])
def test_to_hf_dict_round_trips_and_builds_transformers_twin(size):
    """config.json out and back in gives the same Config; transformers reads the same model from it."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    for c in (Config.preset(size), Config(**{**vars(Config.preset(size)), "rope_scaling": yarn, "dtype": None})):
        out = c.to_hf_dict()
        assert Config.from_hf_dict(json.loads(json.dumps(out))) == c
        hf_config = transformers.Qwen3Config(**out)
        assert (hf_config.num_hidden_layers, hf_config.head_dim, hf_config.tie_word_embeddings) == \
            (c.num_layers, c.head_dim, c.tie_word_embeddings)
        assert hf_config.rope_parameters["rope_theta"] == c.rope_theta
        assert hf_config.rope_parameters["rope_type"] == ("yarn" if c.rope_scaling else "default")


@pytest.mark.parametrize("size", ["0.6B", "8B"])
def test_published_spelling_round_trips_and_builds_transformers_twin(tmp_path, size):
    """The trainer's config.json: the released files' keys (rope_theta, rope_scaling, torch_dtype, which
    transformers 4 reads; without them it uses rope_theta 10000) with their values, beside transformers
    5's rope_parameters; both readers, ours and transformers 5's, see the same model, YaRN included."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    for changes in ({}, {"rope_scaling": yarn, "max_position_embeddings": 131072}):
        released = {**SHARED, **PUBLISHED[size], **changes}
        c = Config.from_pretrained(_published_json(tmp_path, size, **changes))
        out = json.loads(json.dumps(c.to_published_hf_dict()))
        assert {key: out.get(key) for key in released} == released
        assert Config.from_hf_dict(out) == c
        hf_config = transformers.Qwen3Config(**out)
        assert hf_config.rope_parameters == {**(c.rope_scaling or {"rope_type": "default"}), "rope_theta": c.rope_theta}


@pytest.mark.parametrize("change, message", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope type 'linear' is not supported"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope type 'dynamic' is not supported"),
    (dict(use_sliding_window=True), "use_sliding_window=true is not supported"),
    (dict(model_type="qwen2_moe"), "model_type 'qwen2_moe' is not a Qwen3"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(num_key_value_heads=5), r"num_heads \(16\) must be a multiple of Config.num_kv_heads \(5\)"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                        "low_freq_factor": 1}), "does not honour.*low_freq_factor"),
])
def test_unsupported_settings_raise(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        Config.from_pretrained(_published_json(tmp_path, "0.6B", **change))


def test_missing_keys_and_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Config.from_pretrained(tmp_path)
    data = {**SHARED, **PUBLISHED["0.6B"]}
    del data["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(KeyError, match="missing required key 'hidden_size'"):
        Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Config.from_pretrained(tmp_path)

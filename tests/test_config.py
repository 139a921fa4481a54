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


# The published config.json of the Qwen3 MoE releases (Qwen/Qwen3-30B-A3B, Qwen/Qwen3-235B-A22B).
PUBLISHED_MOE = {
    "30B-A3B": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                    num_attention_heads=32, max_window_layers=48),
    "235B-A22B": dict(hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=94,
                      num_attention_heads=64, max_window_layers=94),
}
SHARED_MOE = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936,
                  num_key_value_heads=4, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0,
                  rms_norm_eps=1e-06, torch_dtype="bfloat16", hidden_act="silu", attention_bias=False,
                  attention_dropout=0.0, use_sliding_window=False, sliding_window=None, rope_scaling=None,
                  tie_word_embeddings=False,
                  num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                  mlp_only_layers=[], router_aux_loss_coef=0.001, output_router_logits=False, bos_token_id=151643,
                  eos_token_id=151645, initializer_range=0.02, use_cache=True)


def _published_moe_json(tmp_path, size, **changes):
    data = {**SHARED_MOE, **PUBLISHED_MOE[size], **changes}
    (tmp_path / "config.json").write_text(json.dumps(data))
    return tmp_path


@pytest.mark.parametrize("size", sorted(PUBLISHED_MOE))
def test_moe_presets_equal_the_published_config_json(tmp_path, size):
    parsed = Config.from_pretrained(_published_moe_json(tmp_path, size))
    assert Config.preset(size) == parsed == PRESETS[size]
    assert Config.preset(f"Qwen3-{size.lower()}") == parsed
    assert (parsed.num_experts, parsed.num_experts_per_tok, parsed.norm_topk_prob) == (128, 8, True)
    assert parsed.moe_layers == list(range(parsed.num_layers))  # every layer is MoE


@pytest.mark.parametrize("size, total", [("30B-A3B", 30_532_122_624), ("235B-A22B", 235_093_634_560)])
def test_moe_parameter_count_matches_transformers(size, total):
    c = Config.preset(size)
    hf_config = transformers.Qwen3MoeConfig(**c.to_hf_dict())
    with torch.device("meta"):
        hf = transformers.Qwen3MoeForCausalLM(hf_config)
        model = QWEN(c)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters()) == total
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    E, C, I = 128, c.hidden_size, c.moe_intermediate_size
    assert shapes["blocks.0.ffn.gate.weight"] == (E, C)
    assert shapes["blocks.0.ffn.experts.gate_up_proj"] == (E, 2 * I, C)
    assert shapes["blocks.0.ffn.experts.down_proj"] == (E, C, I)


@pytest.mark.parametrize("size", sorted(PUBLISHED_MOE))
def test_moe_config_round_trips_and_builds_transformers_twin(tmp_path, size):
    released = {**SHARED_MOE, **PUBLISHED_MOE[size]}
    c = Config.from_pretrained(_published_moe_json(tmp_path, size))
    for variant in (c, Config(**{**vars(c), "mlp_only_layers": [0, 5], "decoder_sparse_step": 2, "dtype": None,
                                  "norm_topk_prob": False, "router_aux_loss_coef": 0.01})):
        out = json.loads(json.dumps(variant.to_hf_dict()))
        assert out["model_type"] == "qwen3_moe" and out["architectures"] == ["Qwen3MoeForCausalLM"]
        assert Config.from_hf_dict(out) == variant
        hf_config = transformers.Qwen3MoeConfig(**out)
        assert (hf_config.num_experts, hf_config.num_experts_per_tok, hf_config.moe_intermediate_size,
                hf_config.norm_topk_prob, hf_config.decoder_sparse_step, hf_config.mlp_only_layers,
                hf_config.router_aux_loss_coef, hf_config.head_dim) == \
            (128, 8, variant.moe_intermediate_size, variant.norm_topk_prob, variant.decoder_sparse_step,
             list(variant.mlp_only_layers), variant.router_aux_loss_coef, 128)
    published = json.loads(json.dumps(c.to_published_hf_dict()))
    kept = {k: v for k, v in released.items()
            if k not in ("attention_dropout", "sliding_window", "bos_token_id", "eos_token_id", "initializer_range",
                         "use_cache", "max_window_layers")}  # keys the model does not define (the trainer keeps them)
    assert {key: published.get(key) for key in kept} == kept
    assert Config.from_hf_dict(published) == c


def test_transformers_5_spelling_of_a_moe_config(tmp_path):
    """transformers 5 writes num_experts as num_local_experts and leaves head_dim out when it is
    hidden_size // heads; keys a file leaves out are transformers' Qwen3MoeConfig defaults."""
    hf_config = transformers.Qwen3MoeConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                            num_attention_heads=4, num_key_value_heads=2, num_experts=6,
                                            num_experts_per_tok=3, moe_intermediate_size=16, mlp_only_layers=[3])
    hf_config.save_pretrained(tmp_path)
    c = Config.from_pretrained(tmp_path)
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.mlp_only_layers) == (6, 3, 16, (3,))
    assert c.head_dim == 16 and c.norm_topk_prob is False and c.moe_layers == [0, 1, 2]
    full = Config.preset("30B-A3B").to_hf_dict()
    minimal = {key: full[key] for key in
               ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings", "rope_parameters")}
    d = Config.from_hf_dict(minimal)
    assert (d.num_experts, d.num_experts_per_tok, d.moe_intermediate_size, d.norm_topk_prob, d.decoder_sparse_step,
            d.router_aux_loss_coef) == (128, 8, 768, False, 1, 0.001)


@pytest.mark.parametrize("change, message", [
    (dict(num_experts_per_tok=200), r"Config.num_experts_per_tok \(200\) must not exceed Config.num_experts \(128\)"),
    (dict(num_experts_per_tok=0), "Config.num_experts_per_tok must be an integer >= 1, got 0"),
    (dict(moe_intermediate_size=0), "Config.moe_intermediate_size must be an integer >= 1, got 0"),
    (dict(num_experts=-1), "Config.num_experts must be an integer >= 0, got -1"),
    (dict(decoder_sparse_step=0), "Config.decoder_sparse_step must be an integer >= 1, got 0"),
    (dict(mlp_only_layers=[3, 48]), r"Config.mlp_only_layers must hold layer indices in \[0, 48\), got 48"),
    (dict(router_aux_loss_coef=-0.1), "Config.router_aux_loss_coef must be a number >= 0, got -0.1"),
    (dict(norm_topk_prob="true"), "norm_topk_prob must be true or false, got 'true'"),
    (dict(shared_expert_intermediate_size=768), "shared_expert_intermediate_size=768: Qwen3-MoE has no shared expert"),
])
def test_bad_moe_settings_name_the_field(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        Config.from_pretrained(_published_moe_json(tmp_path, "30B-A3B", **change))


def test_dense_config_is_unchanged_by_the_moe_fields():
    c = Config.preset("8B")
    assert c.num_experts == 0 and c.moe_layers == [] and not any(c.is_moe_layer(i) for i in range(c.num_layers))
    out = c.to_hf_dict()
    assert out["model_type"] == "qwen3" and out["architectures"] == ["Qwen3ForCausalLM"]
    assert not {"num_experts", "moe_intermediate_size", "mlp_only_layers"} & set(out)

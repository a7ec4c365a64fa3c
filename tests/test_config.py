"""config.json of both release layouts -> ModelConfig, with the traps of docs/MODEL.md §2."""
import pytest

import interleave

# The text_config of llava-hf/llava-interleave-qwen-7b-hf omits the sizes, which then take Qwen2's defaults.
HF_7B = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "image_token_index": 151646,
         "projector_hidden_act": "gelu", "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
         "text_config": {"_name_or_path": "Qwen/Qwen1.5-7B-Chat", "architectures": ["Qwen2ForCausalLM"],
                         "intermediate_size": 11008, "model_type": "qwen2", "rope_theta": 1000000.0,
                         "torch_dtype": "bfloat16", "vocab_size": 152000},
         "vision_config": {"hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
                           "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 26,
                           "patch_size": 14, "vision_use_head": False}}

# lmms-lab/llava-next-interleave-qwen-0.5b: Qwen2 fields at the top level, the tower named only by its hub id.
ORIGINAL_05B = {"model_type": "llava_qwen", "architectures": ["LlavaQwenForCausalLM"], "hidden_size": 1024,
                "intermediate_size": 2816, "num_attention_heads": 16, "num_hidden_layers": 24,
                "num_key_value_heads": 16, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "vocab_size": 151936,
                "tie_word_embeddings": True, "mm_vision_tower": "google/siglip-so400m-patch14-384",
                "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 1152, "mm_vision_select_layer": -2,
                "image_aspect_ratio": "anyres"}


def test_7b_hf_defaults():
    c = interleave.config_from_dict(HF_7B)
    t = c.text
    assert (t.hidden, t.layers, t.heads, t.kv_heads, t.head_dim) == (4096, 32, 32, 32, 128)
    assert (t.intermediate, t.rope_theta, t.vocab, t.eps) == (11008, 1e6, 152000, 1e-6)  # the file's, not Qwen2's
    assert t.tie_embeddings is False
    assert c.layout == "hf" and c.image_token_id == 151646 and not c.has_image_newline
    assert (c.vision.hidden, c.vision.layers, c.vision.tokens, c.vision.feature_layer) == (1152, 26, 729, -1)


def test_tie_flag_inside_text_config():
    cfg = {**HF_7B, "text_config": {**HF_7B["text_config"], "tie_word_embeddings": True}}
    assert interleave.config_from_dict(cfg).text.tie_embeddings is True
    cfg = {**HF_7B, "tie_word_embeddings": True}          # top level only
    assert interleave.config_from_dict(cfg).text.tie_embeddings is True
    cfg = {**HF_7B, "tie_word_embeddings": True, "text_config": {**HF_7B["text_config"], "tie_word_embeddings": False}}
    assert interleave.config_from_dict(cfg).text.tie_embeddings is False  # text_config wins


def test_rope_theta_of_transformers_5():
    cfg = {**HF_7B, "text_config": {**HF_7B["text_config"], "rope_theta": None,
                                    "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}}
    assert interleave.config_from_dict(cfg).text.rope_theta == 5e5


def test_original_names_the_tower_only_by_id():
    c = interleave.config_from_dict(ORIGINAL_05B)
    v = c.vision
    assert (v.hidden, v.intermediate, v.heads, v.image_size, v.patch_size, v.eps) == (1152, 4304, 16, 384, 14, 1e-6)
    assert v.act == "gelu_pytorch_tanh"
    # mm_vision_select_layer = -2 is ignored by the release's SigLIP tower: features are the last stored layer.
    assert v.feature_layer == -1
    assert c.layout == "original" and c.has_image_newline and c.image_token_id == 151646
    assert (c.text.hidden, c.text.layers, c.text.vocab, c.text.tie_embeddings) == (1024, 24, 151936, True)
    small = interleave.config_from_dict({**ORIGINAL_05B, "vision_config": {"hidden_size": 48, "num_hidden_layers": 3}})
    assert (small.vision.hidden, small.vision.layers, small.vision.intermediate) == (48, 3, 4304)


@pytest.mark.parametrize("change, words", [
    ({"model_type": "llava_next"}, "unknown model_type 'llava_next'"),
    ({"vision_feature_select_strategy": "default"}, "needs 'full'"),
    ({"projector_hidden_act": "gelu_pytorch_tanh"}, "exact 'gelu'"),
    ({"vision_feature_layer": [-2, -5]}, "single integer"),
    ({"text_config": {"num_attention_heads": 6, "num_key_value_heads": 4}}, "not a multiple"),
    ({"text_config": {"rope_scaling": {"type": "linear", "factor": 2.0}}}, "rope scaling"),
    ({"text_config": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}}, "rope scaling"),
    ({"vision_config": {"model_type": "clip_vision_model"}}, "only SigLIP"),
])
def test_bad_configs_are_named(change, words):
    with pytest.raises(interleave.CheckpointError, match=words.replace("(", r"\(")):
        interleave.config_from_dict({**HF_7B, **change})

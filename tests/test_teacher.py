"""Teacher loading from local folders, and clear errors for what cannot be a teacher."""

from __future__ import annotations

import pytest
from conftest import FAMILIES, tiny_config, tiny_teacher
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, Phi3Config

from echoatt.inputs.teacher import TeacherError, load_teacher


def test_local_directory(teacher_dir):
    teacher = load_teacher(str(teacher_dir))
    assert type(teacher.model).__name__ == "LlamaForCausalLM" and not teacher.model.training
    assert teacher.tokenizer.pad_token is not None


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_stays_its_own_class(tmp_path, tokenizer, family):
    tiny_teacher(family=family, vocab_size=len(tokenizer) + 8).save_pretrained(tmp_path)  # room: Qwen2Tokenizer
    tokenizer.save_pretrained(tmp_path)  # adds <|endoftext|>, as real checkpoints keep spare embedding rows
    model = load_teacher(str(tmp_path)).model
    own = {"llama": "Llama", "llama3": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    assert type(model).__name__ == f"{own}ForCausalLM" and model.config.model_type == tiny_config(family).model_type


def test_unsupported_architecture_is_named(tmp_path, tokenizer):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)).save_pretrained(tmp_path)
    with pytest.raises(TeacherError, match="GPT2LMHeadModel.*supports Llama 1-3.x .* Qwen3"):
        load_teacher(str(tmp_path))


@pytest.mark.parametrize(("config", "differs"), [
    (Gemma3TextConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, vocab_size=128), "Gemma 3: scaled embeddings"),
    (Phi3Config(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=128,
                pad_token_id=0), "Phi-3: fused qkv_proj and gate_up_proj"),
])
def test_near_llama_families_are_refused_with_what_differs(tmp_path, config, differs):
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(TeacherError, match=differs):
        load_teacher(str(tmp_path))


def test_a_sliding_window_teacher_refuses_longer_windows(tmp_path, tokenizer):
    tiny_teacher(family="mistral", vocab_size=len(tokenizer), sliding_window=16).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert load_teacher(str(tmp_path), context=16).model.config.sliding_window == 16
    with pytest.raises(TeacherError, match=r"--seq-len 32 is longer than the sliding window .*\(16 tokens\)"):
        load_teacher(str(tmp_path), context=32)


def test_missing_paths(tmp_path):
    with pytest.raises(TeacherError, match="no such GGUF"):
        load_teacher(str(tmp_path / "x.gguf"))
    with pytest.raises(TeacherError, match="nothing is neither a folder nor a hub id"):
        load_teacher(str(tmp_path / "nothing"))


def test_stamp_changes_with_the_weights(teacher_dir):
    import os

    teacher = load_teacher(str(teacher_dir))
    before = teacher.stamp()
    weights = teacher_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file rewritten
    assert teacher.stamp() != before and str(teacher_dir) in before

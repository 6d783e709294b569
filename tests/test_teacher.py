"""Teacher loading from local folders, and clear errors for what cannot be a teacher."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

from echoatt.teacher import TeacherError, load_teacher


def test_local_directory(teacher_dir):
    teacher = load_teacher(str(teacher_dir))
    assert type(teacher.model).__name__ == "LlamaForCausalLM" and not teacher.model.training
    assert teacher.tokenizer.pad_token is not None


def test_mistral_becomes_llama(tmp_path, tokenizer):
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    MistralForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert type(load_teacher(str(tmp_path)).model).__name__ == "LlamaForCausalLM"


def test_unsupported_architecture_is_named(tmp_path, tokenizer):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)).save_pretrained(tmp_path)
    with pytest.raises(TeacherError, match="GPT2LMHeadModel.*supports LLaMA-style"):
        load_teacher(str(tmp_path))


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

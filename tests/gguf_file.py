"""Write a tiny HF teacher and its byte-level BPE tokenizer as a GGUF file of its family's llama.cpp architecture, the
way llama.cpp's converter lays one out (tensor names from gguf-py's map, Llama's q/k rows permuted, a GPT-2 style
vocabulary: echoatt's own GGUF export helpers), so that GGUF teachers of every family transformers' GGUF loader reads
can be tested without a download."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from echoatt.engines.gguf_export import add_hf_tokenizer, permute_qk
from echoatt.model.configuration_echoatt import head_dim_of


def write_gguf(model, tokenizer, path: Path, name: str = "tiny") -> Path:
    config = model.config
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[config.model_type]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"{name}-mistral" if config.model_type == "mistral" else name)  # llama.cpp files Mistral as llama
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim_of(config))
    writer.add_value_length(head_dim_of(config))
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_hf_tokenizer(writer, tokenizer)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = key.rsplit(".", 1)
        data = tensor.float().numpy()
        if arch == "llama" and base.endswith(("q_proj", "k_proj")):
            heads = config.num_attention_heads if base.endswith("q_proj") else config.num_key_value_heads
            data = permute_qk(data, heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

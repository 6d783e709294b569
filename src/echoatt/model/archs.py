"""The shapes of the models users bring (`bench --arch NAME`), as their config.json files give them, and any supported
config.json read as its family's config class: what the benchmark and the GPU check build with random weights."""

from __future__ import annotations

import json
from pathlib import Path

ARCHS = {  # `bench --arch NAME`: the shapes of the models users bring, as their config.json files give them
    "smollm2-135m": {  # the default teacher: 30 layers, GQA 9/3, tied embeddings
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
    },
    "tinyllama": {  # TinyLlama-1.1B (the papers' setting): 22 layers, GQA 32/4
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": False,
    },
    "qwen3-0.6b": {  # head_dim 128 with hidden 1024 and 16 heads; q/k norms
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
    "qwen2.5-0.5b": {  # q/k/v biases, GQA 14/2
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
    "llama-3.2-1b": {  # llama3 rotary scaling
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
                            "low_freq_factor": 1.0, "original_max_position_embeddings": 8192},
    },
    "mistral-7b": {  # Mistral-7B-v0.3: no sliding window
        "model_type": "mistral", "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "sliding_window": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
}


def arch_config(spec: str):
    """The architecture `bench --arch` measures: a name in `ARCHS` or a config.json of a supported family, as that
    family's config class (anything else refused by name, never silently replaced by LLaMA's defaults)."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from echoatt.common import first_line
    from echoatt.inputs.teacher import check_supported

    if spec in ARCHS:
        data = ARCHS[spec]
    else:
        try:
            data = json.loads(Path(spec).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"--arch {spec}: not one of {', '.join(ARCHS)} nor a readable config.json "
                             f"({first_line(err)})") from err
        if not isinstance(data, dict) or "model_type" not in data:
            raise ValueError(f"--arch {spec}: no model_type in it, not a transformers config.json")
    check_supported(SimpleNamespace(**data))
    fields = {k: v for k, v in data.items() if k not in ("model_type", "architectures", "transformers_version")}
    return AutoConfig.for_model(data["model_type"], **fields)

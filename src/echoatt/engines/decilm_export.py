"""DeciLM / Nemotron-NAS: `echoatt export --format decilm` — a student whose layers keep or drop attention, at any FFN
width, is exactly a Nemotron-NAS / DeciLM model (`block_configs` with `attention.no_op`, `ffn.no_op` and a width per
layer), which vLLM (`nemotron_nas.py`), SGLang, TensorRT-LLM and llama.cpp (`deci`) load. The keys are the ones vLLM's
`DeciLMDecoderLayer` reads: `attention.no_op`, `attention.n_heads_in_group` (query heads per KV head), `ffn.no_op`,
`ffn.ffn_mult` (intermediate size = `int(2 * ffn_mult * hidden / 3)` rounded up to a multiple of 256) or
`ffn.intermediate_size` where no multiplier gives the width back; q/k/v bias as `qkv_bias`, o bias as
`attention_bias`. A no-op attention layer has no `self_attn.*` and no `input_layernorm` weights, a no-op FFN no `mlp.*`
and no `post_attention_layernorm`. Linear attention is refused by name: vLLM's `nemotron_nas` reads no
`replace_with_linear` (it would build full attention); GGUF export runs it in llama.cpp.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from echoatt.engines.support import decilm_refusal
from echoatt.model.configuration_echoatt import EchoAttConfig, llama_fields
from echoatt.planning.plan import PlanError
from echoatt.run.rundir import SHARING_FILE

CONFIG_SOURCE = Path(__file__).with_name("configuration_decilm.py")
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json")


def block_configs(config: EchoAttConfig) -> list[dict]:
    """One DeciLM block per layer; refuses (by layer) what a DeciLM layer cannot be."""
    refusal = decilm_refusal(config)  # what a DeciLM layer cannot be, by name
    if refusal:
        raise PlanError(refusal)
    roles = [config.role(i) for i in range(config.num_hidden_layers)]
    groups = config.num_attention_heads // config.num_key_value_heads
    # A no-op layer's n_heads_in_group is None: llama.cpp's converter reads that as attention-free (vLLM reads no_op).
    return [{"attention": {"no_op": role == "dropped", "replace_with_linear": False,
                           "n_heads_in_group": None if role == "dropped" else groups},
             "ffn": ffn_block(config.hidden_size, config.ffn_width(i))} for i, role in enumerate(roles)]


def ffn_block(hidden: int, width: int) -> dict:
    """A layer's `ffn` block: no-op at width 0, else `ffn_mult` where it rounds back to `width` exactly, else the
    width itself."""
    if width == 0:
        return {"no_op": True, "replace_with_linear": False}
    mult = width * 3 / (2 * hidden)
    rounded = int(2 * mult * hidden / 3)
    size = {"ffn_mult": mult} if -(-rounded // 256) * 256 == width else {"intermediate_size": width}
    return {"no_op": False, "replace_with_linear": False, **size}


def decilm_config(config: EchoAttConfig) -> dict:
    """config.json of the DeciLM folder: LLaMA's fields, the blocks, the biases as DeciLM names them."""
    fields = llama_fields(config)
    out_bias = config.attention_bias if config.attention_out_bias is None else config.attention_out_bias
    if config.context_window is not None:  # the teacher's sliding window bounds the context served
        fields["max_position_embeddings"] = min(fields["max_position_embeddings"], config.context_window)
    fields["rope_theta"] = config.rope_parameters["rope_theta"]  # engines that read no rope_parameters (SGLang)
    fields.update(attention_bias=out_bias, qkv_bias=config.attention_bias, block_configs=block_configs(config),
                  model_type="nemotron-nas", architectures=["DeciLMForCausalLM"],
                  auto_map={"AutoConfig": "configuration_decilm.DeciLMConfig"})
    return fields


def export_decilm(student: Path, out: Path) -> Path:
    """The student folder as a DeciLM folder: config, its class, weights without dropped layers' input norms (nor FFN-free
    layers' post-attention norms), and every other file (tokenizer, generation config) as it is."""
    config = EchoAttConfig.from_pretrained(student)
    fields = decilm_config(config)
    n = config.num_hidden_layers
    unused = ({f"model.layers.{i}.input_layernorm.weight" for i in range(n) if config.role(i) == "dropped"}
              | {f"model.layers.{i}.post_attention_layernorm.weight" for i in range(n) if config.ffn_width(i) == 0})
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(student.iterdir()):
        if path.is_file() and path.name.endswith(".safetensors"):
            weights = load_file(path)
            save_file({k: v.contiguous() for k, v in weights.items() if k not in unused}, out / path.name,
                      metadata={"format": "pt"})
        elif path.name.endswith(".safetensors.index.json"):
            index = json.loads(path.read_text())
            index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in unused}
            (out / path.name).write_text(json.dumps(index, indent=2))
        elif path.is_file() and path.suffix != ".py" and path.name not in ("config.json", SHARING_FILE):
            shutil.copy2(path, out / path.name)
    (out / "config.json").write_text(json.dumps(fields, indent=2))
    shutil.copy2(CONFIG_SOURCE, out / CONFIG_SOURCE.name)
    return out


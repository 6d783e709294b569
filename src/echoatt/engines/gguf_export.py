"""`echoatt export --format gguf`: a student whose layers keep or drop attention as one GGUF file for llama.cpp.

llama.cpp's `deci` architecture (Nemotron-NAS) takes per-layer arrays `deci.attention.head_count`,
`deci.attention.head_count_kv` and `deci.feed_forward_length`; a layer with 0 heads has no attention at all (no
attention tensors, no attention norm) — exactly a dropped layer; a layer with heads but 0 KV heads is "linear
attention", one (C x C) `attn_output` matrix on the normed input — exactly echoatt's `linear_attn`. Each layer's FFN
width is its own. A layer whose FFN width is 0 is written as a one-channel FFN whose down projection is zero: exactly no
FFN, where llama.cpp's own FFN-free layer (width 0) skips the whole layer, its attention included (llama.cpp as
llama-cpp-python 0.3.36 pins it: `if (n_ff == 0) continue;` before the residual sum). Everything else is LLaMA's layout as llama.cpp's
converter writes it (`DeciModel` in `convert_hf_to_gguf.py`): gguf-py's tensor names, q/k rows permuted to llama.cpp's
RoPE order, RMSNorm epsilon, RoPE base and dimensions, no `output.weight` where embeddings are tied.

The tokenizer: copied field by field from the teacher's own GGUF where the teacher was one (the default teacher
is), else built from the student's `tokenizer.json` where that is a byte-level BPE (GPT-2 style: Llama 3, Qwen,
SmolLM, Mistral's Tekken) as llama.cpp's converter stores one; SentencePiece vocabularies are refused by name.

Types: `f32`, `f16` (numpy) and `q8_0` (gguf-py's own quantiser, the same blocks llama.cpp writes); 1-D tensors
(norms) stay f32 as llama.cpp keeps them.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from echoatt.engines.support import gguf_refusal
from echoatt.model.configuration_echoatt import EchoAttConfig
from echoatt.planning.plan import PlanError

TYPES = {  # --type -> (file type, tensor type for 2-D weights)
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
ARCH = "deci"


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter order for LLaMA's q/k rows (transformers' GGUF loader undoes it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_expressible(config: EchoAttConfig) -> None:
    """Refuse, by name, what llama.cpp's `deci` layers cannot be (`support.gguf_refusal`)."""
    refusal = gguf_refusal(config)
    if refusal:
        raise PlanError(refusal)


# The pre-tokenizers of tokenizer.json that llama.cpp has under a name of its own (`tokenizer.ggml.pre`): a byte-level
# BPE splits text by a regex first, and llama.cpp must split it by the same one, or its tokens differ from
# transformers' (its "default" is none of these). Keyed by the split regex of a `Split` + `ByteLevel(use_regex=False)`
# sequence; GPT-2's own regex (`ByteLevel(use_regex=True)`) is "gpt-2", or "smollm" after `Digits(individual)`.
PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",  # Llama 3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",  # Qwen2, Qwen2.5, Qwen3
}


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, or a refusal naming what it is."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [step.get("type") for step in steps]
    byte_level = next((step for step in steps if step.get("type") == "ByteLevel"), None)
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's regex (SmolLM, StarCoder)
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
        name = PRE_TOKENIZERS.get(steps[0].get("pattern", {}).get("Regex"))
        if name:
            return name
    raise PlanError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not one echoatt maps "
                    "to llama.cpp's (GPT-2, SmolLM, Llama 3, Qwen2), and llama.cpp would split text otherwise: export "
                    "with --tokenizer FILE.gguf, a GGUF file of the same tokenizer")


def add_hf_tokenizer(writer: gguf.GGUFWriter, tokenizer) -> None:
    """A byte-level BPE vocabulary (tokenizer.json) as llama.cpp's converter stores one: tokens by id, their types
    (special added tokens CONTROL, other added tokens USER_DEFINED), the merges, the pre-tokenizer by llama.cpp's name,
    the special ids, and whether a BOS or EOS is added (as the tokenizer itself does it)."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    if data["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        raise PlanError("the student's tokenizer is not a byte-level BPE (GPT-2 style); GGUF export copies such "
                        "vocabularies or a teacher GGUF's (--tokenizer FILE.gguf)")
    pre = pre_tokenizer_name(data.get("pre_tokenizer"))
    vocab = {**data["model"]["vocab"], **{t["content"]: t["id"] for t in data["added_tokens"]}}
    tokens, types = [""] * len(vocab), [gguf.TokenType.NORMAL] * len(vocab)
    added = {t["id"]: t["special"] for t in data["added_tokens"]}
    for token, i in vocab.items():
        tokens[i] = token
        if i in added:
            types[i] = gguf.TokenType.CONTROL if added[i] else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    for name, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                        ("pad", tokenizer.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{name}_token_id")(value)
    plain, marked = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    writer.add_add_bos_token(len(marked) > len(plain) and marked[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(marked) > len(plain) and marked[-1] == tokenizer.eos_token_id)


def copy_gguf_tokenizer(writer: gguf.GGUFWriter, source: Path) -> None:
    """Every `tokenizer.*` field of another GGUF file (the teacher's), unchanged."""
    reader = gguf.GGUFReader(str(source))
    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), vtype, sub_type=sub)


def add_parameters(writer: gguf.GGUFWriter, config: EchoAttConfig, file_type) -> None:
    """Hyperparameters as llama.cpp's deci loader reads them, with per-layer head and FFN arrays."""
    n = config.num_hidden_layers
    roles = [config.role(i) for i in range(n)]
    writer.add_block_count(n)
    writer.add_context_length(min(config.max_position_embeddings, config.context_window or 2**31))
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length([config.ffn_width(i) or 1 for i in range(n)])  # 0: a zero one-channel FFN
    writer.add_head_count([0 if r == "dropped" else config.num_attention_heads for r in roles])
    writer.add_head_count_kv([config.num_key_value_heads if config.attends(i) else 0 for i in range(len(roles))])
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)


def checkpoint_tensors(folder: Path):
    """(name, read) for every tensor of a folder's safetensors files, read lazily as a torch tensor in its own dtype
    (numpy has no bfloat16, so a bf16 checkpoint cannot be read as numpy)."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield key, lambda f=f, key=key: f.get_tensor(key)


def tensors(student: Path, config: EchoAttConfig, qtype) -> dict[str, np.ndarray]:
    """The student's weights under llama.cpp's names, q/k permuted, 2-D weights in `qtype` (norms stay f32)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, config.num_hidden_layers)
    unused = {f"model.layers.{i}.input_layernorm.weight" for i in range(config.num_hidden_layers)
              if config.role(i) == "dropped"}
    out = {}
    for key, read in checkpoint_tensors(student):
        if key in unused or (key == "lm_head.weight" and config.tie_word_embeddings):
            continue
        base, suffix = key.rsplit(".", 1)
        data = read().float().numpy()  # one tensor at a time in float32, whatever the checkpoint's dtype (bf16 too)
        if base.endswith(("q_proj", "k_proj")):
            data = permute_qk(data, config.num_attention_heads if base.endswith("q_proj")
                              else config.num_key_value_heads)
        if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(data, qtype)
        out[f"{names.get_name(base)}.{suffix}"] = np.ascontiguousarray(data)
    for i in range(config.num_hidden_layers):  # no FFN: one channel, down projection zero (f32: a 1-wide row)
        if config.ffn_width(i) == 0:
            for part, shape in (("gate_proj", (1, config.hidden_size)), ("up_proj", (1, config.hidden_size)),
                                ("down_proj", (config.hidden_size, 1))):
                out[f"{names.get_name(f'model.layers.{i}.mlp.{part}')}.weight"] = np.zeros(shape, np.float32)
    return out


def export_gguf(student: Path, out: Path, type_name: str = "f16", tokenizer_gguf: Path | None = None) -> Path:
    """Write `student` as one GGUF file `out`; the tokenizer from `tokenizer_gguf` (a teacher's GGUF) or the
    student's own tokenizer.json."""
    from transformers import AutoConfig, AutoTokenizer

    if type_name not in TYPES:
        raise ValueError(f"--type must be one of {', '.join(TYPES)} (got {type_name!r})")
    config = AutoConfig.from_pretrained(student)
    config = config if isinstance(config, EchoAttConfig) else EchoAttConfig.from_teacher(config)  # a teacher: all kept
    check_expressible(config)
    file_type, qtype = TYPES[type_name]
    odd = [i for i in range(config.num_hidden_layers) if config.ffn_width(i) % 32 and config.ffn_width(i) not in (
        0, config.intermediate_size)]
    if qtype == gguf.GGMLQuantizationType.Q8_0 and odd:
        raise PlanError(f"layers {odd} have FFN widths {[config.ffn_width(i) for i in odd]}, which q8_0's blocks of 32 "
                        "values do not divide: export --type f16, or narrow to multiples of 32")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), ARCH)
    writer.add_name(f"{student.name} (echoatt student)")
    add_parameters(writer, config, file_type)
    if tokenizer_gguf is not None:
        copy_gguf_tokenizer(writer, tokenizer_gguf)
    else:
        add_hf_tokenizer(writer, AutoTokenizer.from_pretrained(student))
    for name, data in tensors(student, config, qtype).items():
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(out)
    return out

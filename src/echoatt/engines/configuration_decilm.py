"""The config of a DeciLM / Nemotron-NAS checkpoint, written beside every `echoatt export --format decilm` folder.

Imports only transformers, so `AutoConfig.from_pretrained(folder, trust_remote_code=True)` (which vLLM, SGLang and
TensorRT-LLM call for `model_type: nemotron-nas`) works without echoatt, as NVIDIA's own checkpoints ship theirs. Each
entry of `block_configs` is read by attribute (`block_configs[i].attention.no_op`, `.ffn.ffn_mult`) and stays a dict,
so the config saves as the JSON it was read from.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


class Attributes(dict):
    """A JSON object read by attribute (engines write `block.attention.no_op`); a missing key is a missing attribute,
    so `hasattr(block.ffn, "ffn_mult")` answers False rather than raising."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def of(cls, value):
        return cls({k: cls.of(v) for k, v in value.items()}) if isinstance(value, dict) else value


@strict
class DeciLMConfig(LlamaConfig):
    r"""A `LlamaConfig` whose layers differ: `block_configs` (`list[dict]`), one per layer, each with `attention`
    (`no_op`, `n_heads_in_group`, `replace_with_linear`) and `ffn` (`no_op`, `ffn_mult`, `replace_with_linear`)."""

    model_type = "nemotron-nas"

    block_configs: list | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.block_configs = [Attributes.of(block) for block in self.block_configs or []]

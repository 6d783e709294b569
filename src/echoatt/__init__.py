"""echoatt: share attention across the layers of a Llama, Mistral or Qwen model, then distil it back to quality."""

from transformers import AutoConfig, AutoModelForCausalLM

from echoatt.configuration_echoatt import EchoAttConfig
from echoatt.modeling_echoatt import EchoAttForCausalLM
from echoatt.versions import VERSION, check_transformers

check_transformers()

AutoConfig.register(EchoAttConfig.model_type, EchoAttConfig)
AutoModelForCausalLM.register(EchoAttConfig, EchoAttForCausalLM)

__all__ = ["EchoAttConfig", "EchoAttForCausalLM", "compress"]
__version__ = VERSION


def __getattr__(name: str):
    """`echoatt.compress` (the one-call API) is imported when first used, so `import echoatt` stays light."""
    if name == "compress":
        from echoatt.api import compress

        return compress
    raise AttributeError(f"module 'echoatt' has no attribute {name!r}")

"""echoatt: share attention across the layers of a Llama, Mistral or Qwen model, then distil it back to quality."""

from transformers import AutoConfig, AutoModelForCausalLM

from echoatt.modeling import EchoAttConfig, EchoAttForCausalLM
from echoatt.versions import check_transformers

check_transformers()

AutoConfig.register(EchoAttConfig.model_type, EchoAttConfig)
AutoModelForCausalLM.register(EchoAttConfig, EchoAttForCausalLM)

__all__ = ["EchoAttConfig", "EchoAttForCausalLM"]
__version__ = "0.1.0"

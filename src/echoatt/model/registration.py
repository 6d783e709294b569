"""The student's place in transformers' Auto classes: `register()` puts `EchoAttConfig` and `EchoAttForCausalLM` there
(once), so `AutoModelForCausalLM.from_pretrained(student)` loads a student without `trust_remote_code`. Importing
`echoatt` calls it; the command line calls it when a command runs (its `--help` needs no model code)."""

from __future__ import annotations


def register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from echoatt.model.configuration_echoatt import EchoAttConfig
    from echoatt.model.modeling_echoatt import EchoAttForCausalLM
    from echoatt.versions import check_transformers

    if getattr(register, "done", False):
        return
    check_transformers()
    AutoConfig.register(EchoAttConfig.model_type, EchoAttConfig, exist_ok=True)
    AutoModelForCausalLM.register(EchoAttConfig, EchoAttForCausalLM, exist_ok=True)
    register.done = True

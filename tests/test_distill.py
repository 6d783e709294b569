"""Distillation on a tiny model: it learns, resumes exactly, stops cleanly on bad input, runs on 2 processes."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from echoatt.building.student import build_student, save_student
from echoatt.inputs.teacher import load_teacher
from echoatt.planning import planners
from echoatt.run.config import DistillConfig
from echoatt.run.rundir import RunDir, RunDirError
from echoatt.training.distill import TrainingError, batch_indices, distill
from echoatt.training.losses import KDLoss


@pytest.fixture
def run_dir(tmp_path, teacher_dir, monkeypatch):
    """OUT with a k=2 student of the tiny teacher, as `echoatt share` leaves it."""
    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))
    teacher = load_teacher(str(teacher_dir))
    student = build_student(teacher.model, planners.from_k(6, 2))
    save_student(student, teacher.tokenizer, tmp_path / "run" / "student")
    return tmp_path / "run"


def config(run_dir, teacher_dir, corpus_dir, **kw) -> DistillConfig:
    base = {"teacher": str(teacher_dir), "corpus": str(corpus_dir), "seq_len": 32, "out": str(run_dir), "steps": 6,
                "batch_size": 2, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 2, "eval_every": 3, "eval_windows": 4, "save_every": 3,
                "device": "cpu", "trainable": "all"}
    base.update(kw)
    return DistillConfig(**base)


def log_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_training_reduces_the_distillation_loss(run_dir, teacher_dir, corpus_dir):
    from transformers import AutoModelForCausalLM

    from echoatt.inputs.corpus import token_windows

    cfg = config(run_dir, teacher_dir, corpus_dir, steps=20, eval_every=10, lr=1e-4, w_hard=0.0)
    teacher = load_teacher(str(teacher_dir))
    held_out = token_windows(teacher.tokenizer, str(corpus_dir), 32)[1][:4]
    loss = cfg.kd_loss()
    before = loss(AutoModelForCausalLM.from_pretrained(run_dir / "student"), teacher.model, held_out)
    result = distill(cfg)
    after = loss(AutoModelForCausalLM.from_pretrained(result["student"]), teacher.model, held_out)
    assert after["loss"] < 0.97 * before["loss"]
    steps = [e for e in log_of(run_dir) if "loss" in e]
    assert len(steps) == 20 and all(k in steps[0] for k in ("hard", "soft", "hidden", "lr", "tokens_per_s"))
    assert [e["step"] for e in result["validation"]] == [0, 10, 20]
    assert (run_dir / "distill.yaml").is_file() and (run_dir / "distill_summary.json").is_file()
    summary = json.loads((run_dir / "distill_summary.json").read_text())["training"]
    assert summary["precision"]["name"] == "fp32" and {e["precision"] for e in steps} == {"fp32"}
    assert summary["tokens_per_s"] > 0 and summary == result["training"]
    profiled = [e for e in steps if "matmul_share" in e]
    assert [e["step"] for e in profiled] == [2] and 0 < summary["matmul_share"] < 1
    assert summary["matmul_share"] == pytest.approx(profiled[0]["matmul_share"], abs=1e-4)


@pytest.mark.parametrize("kill, kept", [(RuntimeError, 3), (KeyboardInterrupt, 4)])
def test_resume_after_a_kill_reproduces_the_run(run_dir, teacher_dir, corpus_dir, tmp_path, monkeypatch, kill, kept):
    """A crash in step 5 keeps the step-3 checkpoint; Ctrl-C there saves step 4 first. Either way --resume auto
    continues to the same losses as a run never stopped."""
    fresh = tmp_path / "fresh"
    shutil.copytree(run_dir, fresh)
    distill(config(fresh, teacher_dir, corpus_dir))
    uninterrupted = [e for e in log_of(fresh) if "loss" in e]

    calls = {"n": 0}
    real = KDLoss.__call__

    def dies_in_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4 * 2:  # 2 micro-batches a step: the 9th call is step 5
            raise kill("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(KDLoss, "__call__", dies_in_step_5)
    with pytest.raises(kill):
        distill(config(run_dir, teacher_dir, corpus_dir))
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step-{kept:06d}"
    monkeypatch.setattr(KDLoss, "__call__", real)
    distill(config(run_dir, teacher_dir, corpus_dir))  # --resume auto
    resumed = [e for e in log_of(run_dir) if "loss" in e]
    assert [e["step"] for e in resumed] == list(range(1, 7))
    for a, b in zip(resumed[kept:], uninterrupted[kept:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["lr"] == pytest.approx(b["lr"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(run_dir, teacher_dir, corpus_dir, monkeypatch):
    real = KDLoss.__call__
    calls = {"n": 0}

    def nan_in_step_3(*args, **kwargs):
        calls["n"] += 1
        terms = real(*args, **kwargs)
        if calls["n"] == 5:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(KDLoss, "__call__", nan_in_step_3)
    with pytest.raises(TrainingError, match="non-finite loss at step 3.*step-000002"):
        distill(config(run_dir, teacher_dir, corpus_dir, save_every=1))
    assert (run_dir / "checkpoints" / "step-000002" / "student" / "model.safetensors").is_file()


def test_bad_input_is_refused(run_dir, teacher_dir, corpus_dir, tmp_path):
    with pytest.raises(ValueError, match="--keep-checkpoints must be at least 1"):  # `[:-0]` would keep them all
        distill(config(run_dir, teacher_dir, corpus_dir, keep_checkpoints=0))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        distill(config(run_dir, teacher_dir, corpus_dir, seq_len=4096))
    with pytest.raises(RunDirError, match="run `echoatt share` first"):
        distill(config(tmp_path / "empty", teacher_dir, corpus_dir))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short")
    from echoatt.inputs.corpus import CorpusError

    with pytest.raises(CorpusError, match="corpus too short"):
        distill(config(run_dir, teacher_dir, tiny))


def test_generated_share_is_mixed_into_the_training_windows(run_dir, teacher_dir, corpus_dir):
    from accelerate import Accelerator

    from echoatt.inputs.corpus import generated_windows, token_windows
    from echoatt.training.distill import load_inputs

    cfg = config(run_dir, teacher_dir, corpus_dir, generated=0.25)  # 6 steps x 4 windows read: 6 written, 18 corpus
    teacher = load_teacher(str(teacher_dir))
    train = load_inputs(cfg, teacher, Accelerator(cpu=True))["train_windows"]
    corpus = token_windows(teacher.tokenizer, str(corpus_dir), 32)[0]
    assert train.shape == (24, 32)
    assert torch.equal(train[18:], generated_windows(teacher, 6, 32, cfg.seed))
    assert all((corpus == row).all(dim=1).any() for row in train[:18])
    with pytest.raises(ValueError, match="--generated"):
        config(run_dir, teacher_dir, corpus_dir, generated=1.5).validate()


def test_data_order_depends_only_on_seed_and_step():
    cfg = DistillConfig(batch_size=3, grad_accum=2, seed=7)
    seen = [batch_indices(s, m, cfg, 10, r, 2) for s in range(2) for m in range(2) for r in range(2)]
    first_epoch = [int(i) for b in seen for i in b][:10]
    assert sorted(first_epoch) == list(range(10))  # an epoch is a permutation
    assert all((a == b).all() for a, b in zip(seen, [batch_indices(s, m, cfg, 10, r, 2) for s in range(2) for m in range(2) for r in range(2)]))


def test_two_processes_train_the_same_model(run_dir, teacher_dir, corpus_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    worker = Path(__file__).with_name("dist_worker.py")
    import socket

    with socket.socket() as probe:  # a free port: a fixed one can be taken by another socket on the machine
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(worker), str(run_dir), str(teacher_dir), str(corpus_dir)]
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    ranks = json.loads((run_dir / "checksums.json").read_text())  # each rank's own in-memory weights, gathered
    assert len(ranks) == 2 and ranks[0]["memory"] == ranks[1]["memory"] == ranks[0]["disk"]
    entries = [e for e in log_of(run_dir) if "loss" in e]
    assert [e["step"] for e in entries] == [1, 2, 3]


@pytest.mark.parametrize("error", ["OSError", "SafetensorError"])  # safetensors' writer raises its own on a full disk
def test_disk_full_is_a_message_and_keeps_the_last_checkpoint(run_dir, teacher_dir, corpus_dir, monkeypatch, error):
    import errno

    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained
    calls = {"n": 0}

    def fills_the_disk(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint
            raise (OSError(errno.ENOSPC, "No space left on device") if error == "OSError" else
                   SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fills_the_disk)
    with pytest.raises(TrainingError, match="checkpoint at step 6 \\(disk full\\); kept: .*step-000003"):
        distill(config(run_dir, teacher_dir, corpus_dir))
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-000003"
    assert not list((run_dir / "checkpoints").glob("*.partial"))


def test_tied_embeddings_checkpoint_quietly_and_stay_tied(tmp_path, tokenizer, corpus_dir, monkeypatch):
    import logging

    from conftest import tiny_teacher

    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tied-teacher"
    tiny_teacher(vocab_size=len(tokenizer), tie_word_embeddings=True).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    teacher = load_teacher(str(folder))
    save_student(build_student(teacher.model, planners.from_k(6, 2)), teacher.tokenizer, tmp_path / "run" / "student")
    heard: list[str] = []
    collect = logging.Handler()
    collect.emit = lambda record: heard.append(record.getMessage())
    logging.getLogger("accelerate.utils.other").addHandler(collect)
    try:
        result = distill(config(tmp_path / "run", folder, corpus_dir, steps=2, save_every=1))
    finally:
        logging.getLogger("accelerate.utils.other").removeHandler(collect)
    assert not [m for m in heard if "Removed shared tensor" in m], heard
    from transformers import AutoModelForCausalLM

    for path in (result["student"], tmp_path / "run" / "checkpoints" / "step-000002" / "student"):
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_logged_peak_memory_is_each_steps_own(run_dir, teacher_dir, corpus_dir):
    """The log's `peak_memory_bytes` (what a user sizes the batch by) is the step's peak, not the process's history:
    a large allocation freed before distillation (as `run`'s analysis and calibration are) does not show in it."""
    from echoatt.training.memory import PeakMemory

    rss = PeakMemory(torch.device("cpu"))._resident("VmRSS")
    big = torch.ones(2**30)  # 4 GiB, touched, then handed back
    del big
    distill(config(run_dir, teacher_dir, corpus_dir, steps=2, eval_every=0, save_every=0))
    peaks = [e["peak_memory_bytes"] for e in log_of(run_dir) if "loss" in e]
    assert peaks and all(p is not None and p < rss + 2**31 for p in peaks), (rss, peaks)


def test_distillation_runs_on_the_gpu_device_names(monkeypatch):
    """`--device cuda:N` makes GPU N the current device before the Accelerator is made (accelerate puts a single
    process on the current device: distillation would otherwise run on GPU 0 while `run`'s other steps use N);
    under a multi-process launch an index is refused."""
    from echoatt.training import distill as distill_module
    from echoatt.training.distill import make_accelerator

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "a GPU")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", str(device))))
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda p: calls.append(("precision", p)))
    monkeypatch.setattr(distill_module, "Accelerator", lambda **kw: calls.append(("Accelerator", kw)))
    make_accelerator(DistillConfig(device="cuda:1"))
    assert calls == [("set_device", "cuda:1"), ("precision", "high"),
                     ("Accelerator", {"mixed_precision": "bf16", "cpu": False})]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="each process takes its own GPU"):
        make_accelerator(DistillConfig(device="cuda:1"))


def test_a_second_student_trains_from_the_cached_teacher_outputs(run_dir, teacher_dir, corpus_dir, tmp_path,
                                                                   monkeypatch, capsys):
    """With --teacher-cache the first run keeps the teacher's outputs on the windows it reads; a second run on the
    same windows reads them all and never runs the teacher's layers, to the same losses as the first."""
    from echoatt.training.losses import TeacherOutputs

    cache = tmp_path / "teacher-outputs"
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    cfg = lambda out: config(out, teacher_dir, corpus_dir, steps=3, eval_every=0, save_every=0,
                             teacher_cache=str(cache))
    distill(cfg(run_dir))
    said = capsys.readouterr().out
    assert "0 windows read from the cache, 12 computed and kept" in said and "12 windows x" in said
    real = KDLoss.__call__

    def no_teacher(self, student, teacher, ids, fused=True, cached=None):
        assert isinstance(cached, TeacherOutputs)
        teacher.forward = None  # its layers are not run; its output layer makes the logits from the kept states
        return real(self, student, teacher, ids, fused, cached)

    monkeypatch.setattr(KDLoss, "__call__", no_teacher)
    distill(cfg(other))
    assert "12 windows read from the cache, 0 computed" in capsys.readouterr().out
    for a, b in zip([e for e in log_of(run_dir) if "loss" in e], [e for e in log_of(other) if "loss" in e]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="--cache-top-k"):
        config(run_dir, teacher_dir, corpus_dir, cache_top_k=-1).validate()
    from echoatt import common

    monkeypatch.setattr(common.shutil, "disk_usage", lambda path: USAGE(10**9, 10**9, 1000))
    third = tmp_path / "third"
    shutil.copytree(run_dir / "student", third / "student")
    with pytest.raises(ValueError, match="writes .* teacher outputs .* are free; .*--teacher-cache DIR"):
        distill(config(third, teacher_dir, corpus_dir, steps=6, teacher_cache=str(cache)))  # 12 of them not kept yet
    assert not (third / "log.jsonl").exists()  # refused before any step


USAGE = collections.namedtuple("usage", "total used free")  # what shutil.disk_usage returns


def test_a_run_whose_checkpoints_would_not_fit_is_refused_before_training(run_dir, teacher_dir, corpus_dir,
                                                                          monkeypatch):
    """The run's disk need is its checkpoints (keep + 1 at once, each the size one really takes) and the trained
    student: a disk one byte short is refused before the first step, and one that holds exactly that trains."""
    from echoatt import common
    from echoatt.training.checkpoints import checkpoint_bytes, weight_bytes

    student = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    each, weights = checkpoint_bytes(student), weight_bytes(student)
    monkeypatch.setattr(common.shutil, "disk_usage", lambda path: USAGE(10**9, 10**9, 3 * each + weights - 1))
    with pytest.raises(ValueError, match=r"writes 3 checkpoint\(s\) of .* GiB are free; .*--keep-checkpoints"):
        distill(config(run_dir, teacher_dir, corpus_dir, steps=9, keep_checkpoints=2))
    assert not (run_dir / "log.jsonl").exists() and not (run_dir / "checkpoints").exists()
    monkeypatch.setattr(common.shutil, "disk_usage", lambda path: USAGE(10**9, 10**9, 3 * each + weights))
    distill(config(run_dir, teacher_dir, corpus_dir, steps=9, keep_checkpoints=2))
    written = run_dir / "checkpoints" / "step-000009"
    model_files = [f for f in written.rglob("*") if f.suffix in (".safetensors", ".bin") and "rng" not in f.name]
    assert sum(f.stat().st_size for f in model_files) == pytest.approx(each, rel=0.05)
    # resumed with steps 6 and 9 kept: the one save left writes a third checkpoint before the oldest is pruned
    monkeypatch.setattr(common.shutil, "disk_usage", lambda path: USAGE(10**9, 10**9, each + weights - 1))
    with pytest.raises(ValueError, match=r"writes 1 checkpoint\(s\) of "):
        distill(config(run_dir, teacher_dir, corpus_dir, steps=12, keep_checkpoints=2))
    monkeypatch.setattr(common.shutil, "disk_usage", lambda path: USAGE(10**9, 10**9, each + weights))
    distill(config(run_dir, teacher_dir, corpus_dir, steps=12, keep_checkpoints=2))
    assert [c.path.name for c in RunDir(run_dir).finished_checkpoints()] == ["step-000009", "step-000012"]


def test_key_token_weighting_weighs_each_window_read_by_its_cached_context_gain(run_dir, teacher_dir, corpus_dir,
                                                                               monkeypatch):
    """--w-long: each micro-batch's hard and soft terms are weighted by `context_weights` of the teacher's context
    gain on its windows (computed once per window and kept); --w-long 0 is the plain loss; too short a window for
    any far context is refused."""
    from echoatt.evaluation import key_tokens

    seen = []
    real = KDLoss.__call__

    def recorded(self, student, teacher, ids, fused=True, cached=None, weights=None):
        seen.append((ids, weights))
        return real(self, student, teacher, ids, fused, cached, weights)

    monkeypatch.setattr(KDLoss, "__call__", recorded)
    cfg = config(run_dir, teacher_dir, corpus_dir, seq_len=140, steps=2, eval_every=0, save_every=0, w_long=0.5)
    distill(cfg)
    teacher = load_teacher(str(teacher_dir))
    assert len(seen) == 4 and all(w is not None and w.shape == (2, 139) for _, w in seen)
    ids, weights = seen[0]
    gain = key_tokens.context_gain(teacher.model, ids)
    torch.testing.assert_close(weights, key_tokens.context_weights(gain, 0.5))
    assert (weights[:, key_tokens.FAR_FROM - 1 :] != 1).any()
    kept = list((Path(os.environ["ECHOATT_CACHE"]) / "key-tokens").rglob("*.safetensors"))
    assert len(kept) == len({tuple(row.tolist()) for ids, _ in seen for row in ids})  # one file a window read
    seen.clear()
    distill(config(run_dir, teacher_dir, corpus_dir, seq_len=140, steps=1, eval_every=0, save_every=0, resume="never"))
    assert all(w is None for _, w in seen)  # --w-long 0: no weights, today's loss exactly
    for bad, match in (({"w_long": -1}, "--w-long is a weight"), ({"w_long": 1, "seq_len": 128}, "far context"),
                       ):
        with pytest.raises(ValueError, match=match):
            config(run_dir, teacher_dir, corpus_dir, **bad).validate()



def test_on_a_cpu_with_native_bf16_auto_trains_under_bf16_autocast(run_dir, teacher_dir, corpus_dir, native_bf16,
                                                                     monkeypatch, request):
    """fp32 master weights (the saved student stays float32), bf16 matmuls inside the step, the precision named in
    the log and summary."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # accelerate keeps one precision per process: this test's is bf16
    request.addfinalizer(lambda: AcceleratorState._reset_state(True))
    seen = []
    original = KDLoss.__call__

    def spy(self, student, teacher, ids, **kw):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return original(self, student, teacher, ids, **kw)

    monkeypatch.setattr(KDLoss, "__call__", spy)
    result = distill(config(run_dir, teacher_dir, corpus_dir, steps=2))
    assert seen and set(seen) == {torch.bfloat16}
    assert {e["precision"] for e in log_of(run_dir) if "loss" in e} == {"bf16 autocast"}
    assert json.loads((run_dir / "distill_summary.json").read_text())["training"]["precision"]["bf16"] is True
    assert all(p.dtype == torch.float32 for p in result["model"].parameters())

"""Precision follows the hardware: bf16 autocast where the device multiplies bf16 natively, fp32 elsewhere; `--bf16
yes` refused in one line where bf16 is emulated; every distillation names what it ran in."""

from __future__ import annotations

import torch

from echoatt.cli import main
from echoatt.training import precision
from echoatt.training.precision import Precision, resolve


def test_torch_still_reports_the_cpu_features_auto_reads():
    """`precision.cpu_bf16_feature` reads these keys of torch's CPU capabilities: this fails if torch renames them."""
    capabilities = torch.cpu.get_capabilities()
    assert hasattr(capabilities, "get")  # a read-only mapping
    assert all(isinstance(capabilities.get(key), bool) for key in precision.NATIVE_CPU_FEATURES)


def test_auto_picks_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch):
    for flags, bf16 in (({"amx_bf16": True, "avx512_bf16": True}, True), ({"avx512_bf16": True}, True),
                        ({"avx2": True}, False)):
        monkeypatch.setattr(precision, "cpu_bf16_feature", lambda f=flags: next(
            (name for key, name in precision.NATIVE_CPU_FEATURES.items() if f.get(key)), None))
        chosen = resolve("auto", "cpu")
        assert chosen.bf16 is bf16 and chosen.name == ("bf16 autocast" if bf16 else "fp32"), (flags, chosen)
        assert resolve("no", "cpu") == Precision(False, "--bf16 no")


def test_the_reason_names_the_feature_found(native_bf16):
    assert resolve("auto", "cpu").why.endswith("(AVX512-BF16)")
    assert resolve("yes", "cpu").bf16


def test_bf16_yes_without_native_bf16_is_refused_in_one_line_before_any_model_loads(tmp_path, capsys):
    code = main(["distill", "--bf16", "yes", "--device", "cpu", "--teacher", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "--bf16 yes" in err and "neither AMX nor AVX512-BF16" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written or loaded


def test_autocast_is_bf16_where_chosen():
    layer = torch.nn.Linear(8, 8)
    with Precision(True, "test").autocast("cpu"):
        assert layer(torch.randn(2, 8)).dtype == torch.bfloat16
    with Precision(False, "test").autocast("cpu"):
        assert layer(torch.randn(2, 8)).dtype == torch.float32


def test_teacher_outputs_computed_under_bf16_autocast_are_kept_apart_from_fp32_ones(tmp_path):
    from echoatt.training.teacher_cache import TeacherCache

    model = torch.nn.Linear(4, 4)
    folders = {TeacherCache(tmp_path, "teacher", 0, 2.0, model, autocast=bf16).folder for bf16 in (False, True)}
    assert len(folders) == 2

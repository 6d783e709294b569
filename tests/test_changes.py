"""Every kind of change is whole: a name in the plan syntax that reads back, a builder, a cost in the cost model, a
fit or none by declaration (`calibrate.FITS`), and a yes or a named refusal from every engine without echoatt."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_teacher

from echoatt.building.calibrate import FITS, calibrate_student
from echoatt.building.student import build_student
from echoatt.engines import support
from echoatt.planning.cost_model import forward_cost
from echoatt.planning.plan import CHANGE_KINDS, Change, SharingPlan
from echoatt.run.rundir import SHARING_FILE, SharingInfo

EXAMPLE = {"share": "1-2", "drop": "drop=3", "linear": "linear=3", "ffn": "ffn=3:64"}  # one of each kind


def test_every_kind_has_an_example():
    assert set(EXAMPLE) == set(CHANGE_KINDS) == set(FITS)


@pytest.mark.parametrize("kind", CHANGE_KINDS)
def test_each_kind_of_change_has_a_name_a_builder_a_cost_a_fit_and_an_answer_from_every_engine(kind):
    change = Change.read(EXAMPLE[kind])
    assert change.kind == kind and Change.read(change.name) == change and str(change) == EXAMPLE[kind]
    teacher = tiny_teacher()
    plan = SharingPlan.of([change], 6)
    assert plan.changes() == [change] and SharingPlan.read(plan.spec(), 6) == plan
    student = build_student(teacher, plan)  # the builder
    config = student.config
    assert set(config.changed()) & set(change.layers), kind
    cost, full = (forward_cost(c, 1, 64, 0, False, 2) for c in (config, teacher.config))
    assert cost.flops < full.flops or cost.bytes < full.bytes, kind  # the cost model knows what it saves
    windows = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(0))
    fitted = calibrate_student(student, teacher, windows, 1e-2, progress=False)
    assert bool(fitted) == (FITS[kind] is not None), (kind, fitted)  # fitted exactly where declared
    for check in (support.gguf_refusal, support.decilm_refusal, support.vllm_refusal):
        answer = check(config)
        assert answer is None or (isinstance(answer, str) and answer), (kind, check.__name__)
    assert support.vllm_refusal(config) is None  # echoatt's own vLLM model runs every kind


def test_changes_say_which_attention_they_touch_and_what_they_replace():
    block, bigger, drop, linear, ffn, narrower = map(Change.read, ("1-2", "1-3", "drop=2", "linear=2", "ffn=2:128",
                                                                   "ffn=2:64"))
    assert block.followers == (2,) and block.attention_layers == {1, 2} and ffn.attention_layers == set()
    assert bigger.replaces(block) and not block.replaces(bigger) and drop.replaces(linear)
    assert not linear.replaces(drop) and narrower.replaces(ffn) and not ffn.replaces(narrower)
    assert drop.overlaps(block) and ffn.overlaps(narrower) and not ffn.overlaps(drop)
    for bad in ("3-3", "4-2", "drop=x", "ffn=3"):
        with pytest.raises(ValueError):
            Change.read(bad)


def test_the_saved_plan_is_its_spec_and_older_files_read_as_one(tmp_path):
    """One description of a plan: `sharing.json` keeps the spec; a file of the older list per kind reads as its spec."""
    older = {"identity": {"attention_source": [0, 1, 1, 3, -1, 5]}, "plan": [[1, 2]], "dropped": [4], "linear": [],
             "ffn": [[3, 64]], "method": "copy", "head_map": None, "lisa": None, "parameters": {},
             "kv_cache_bytes_per_token_bf16": {}}
    (tmp_path / SHARING_FILE).write_text(json.dumps(older))
    info = SharingInfo.load(tmp_path)
    assert info.plan == "1-2,drop=4,ffn=3:64" and info.sharing_plan() == SharingPlan(6, ((1, 2),), (4,), (), ((3, 64),))
    info.save(tmp_path)
    saved = json.loads((tmp_path / SHARING_FILE).read_text())
    assert saved["plan"] == info.plan and not {"dropped", "linear", "ffn"} & set(saved)

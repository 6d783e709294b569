"""`echoatt export --format decilm` (the folder's config, weights and refusals, read back with transformers) and what
a run says about serving; vLLM itself loads the export in tests/test_serve.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_teacher
from safetensors.torch import load_file
from transformers import AutoConfig

from echoatt.building.student import build_student
from echoatt.cli import main
from echoatt.engines.vllm_serve import case_bounds, check_servable, kv_bytes_per_token, parse_cases, serving_text
from echoatt.model.configuration_echoatt import EchoAttConfig
from echoatt.planning.cost_model import forward_cost
from echoatt.planning.plan import PlanError, SharingPlan


def saved_student(tmp_path, family="llama", plan=None, method="drop", **overrides):
    teacher = tiny_teacher(0, family, **overrides)
    student = build_student(teacher, plan or SharingPlan(6, ((2, 3, 4),)), None, method)
    student.save_pretrained(tmp_path / "student")
    return tmp_path / "student"


def test_a_drop_student_exports_as_decilm_blocks(tmp_path, capsys):
    student = saved_student(tmp_path, "qwen2", intermediate_size=96)  # no ffn_mult rounds to 96 (256s): given as is
    assert main(["export", str(tmp_path / "out"), "--student", str(student)]) == 0
    assert "vllm serve" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    assert [b["attention"]["no_op"] for b in config["block_configs"]] == [False, False, False, True, True, False]
    assert [b["attention"]["n_heads_in_group"] for b in config["block_configs"]] == [2, 2, 2, None, None, 2]
    assert config["qkv_bias"] is True and config["attention_bias"] is False  # Qwen2: q/k/v bias, none on o
    teacher_theta = AutoConfig.from_pretrained(student).rope_parameters["rope_theta"]
    assert config["rope_theta"] == teacher_theta  # engines that read no rope_parameters (SGLang) would take 10000
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert "model.layers.3.input_layernorm.weight" not in weights  # a no-op attention layer has no input norm
    assert "model.layers.2.input_layernorm.weight" in weights and "model.layers.3.mlp.up_proj.weight" in weights
    assert not any(k.startswith("model.layers.3.self_attn") for k in weights)
    loaded = AutoConfig.from_pretrained(tmp_path / "out", trust_remote_code=True)  # the class beside it, no echoatt
    assert type(loaded).__module__.startswith("transformers_modules")
    assert loaded.block_configs[3].attention.no_op and not hasattr(loaded.block_configs[0].ffn, "ffn_mult")
    assert loaded.block_configs[0].ffn.intermediate_size == 96


def test_ffn_mult_gives_the_teachers_intermediate_size_back(tmp_path):
    student = saved_student(tmp_path, "llama", hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                            num_key_value_heads=3)  # SmolLM2's shape
    main(["export", str(tmp_path / "out"), "--student", str(student)])
    block = json.loads((tmp_path / "out" / "config.json").read_text())["block_configs"][0]
    mult = block["ffn"]["ffn_mult"]
    assert mult == 4.0 and -(-int(2 * mult * 576 / 3) // 256) * 256 == 1536  # vLLM's rounding


def test_ffn_widths_export_as_decilm_blocks(tmp_path):
    """A narrowed FFN is its width (or the ffn_mult that rounds back to it); an FFN-free layer is `ffn.no_op`, without
    its MLP and post-attention norm weights (vLLM's DeciLM layer has neither then)."""
    student = saved_student(tmp_path, plan=SharingPlan.read("drop=3,ffn=1:64,ffn=2:0", 6))
    main(["export", str(tmp_path / "out"), "--student", str(student)])
    blocks = json.loads((tmp_path / "out" / "config.json").read_text())["block_configs"]
    assert [b["ffn"].get("intermediate_size") for b in blocks] == [128, 64, None, 128, 128, 128]
    assert [b["ffn"]["no_op"] for b in blocks] == [False, False, True, False, False, False]
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert not any(k.startswith(("model.layers.2.mlp", "model.layers.2.post_attention")) for k in weights)
    assert weights["model.layers.1.mlp.down_proj.weight"].shape == (64, 64)


@pytest.mark.parametrize(("family", "method", "said", "plan"), [
    ("llama", "copy", "reuse another layer's attention", None), ("qwen3", "drop", "normalises q and k", None),
    ("llama", "copy", "linear map, which vLLM's DeciLM model does not read", "linear=2")])
def test_export_refuses_what_decilm_cannot_be(tmp_path, capsys, family, method, said, plan):
    student = saved_student(tmp_path, family, plan=plan and SharingPlan.read(plan, 6), method=method)
    assert main(["export", str(tmp_path / "out"), "--student", str(student)]) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "out" / "config.json").exists()


def test_export_refuses_a_folder_that_is_no_student(tmp_path, capsys):
    assert main(["export", str(tmp_path / "out"), "--student", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_serving_text_names_the_engine_for_each_kind_of_student(tmp_path):
    copy = EchoAttConfig(num_hidden_layers=4, attention_source=[0, 1, 1, 3])
    drop = EchoAttConfig(num_hidden_layers=4, attention_source=[0, 1, -1, 3])
    lisa = EchoAttConfig(num_hidden_layers=4, attention_source=[0, 1, 1, 3], follower_type="lisa")
    assert "vllm serve" in serving_text(tmp_path, copy)[0] and "keys again" in serving_text(tmp_path, copy)[1]
    assert "--format gguf" in serving_text(tmp_path, drop)[1]
    advice = serving_text(tmp_path, copy)[1]  # the servable plan is the default budget, dropped attention alone
    assert "`--plan budget=decode=1.15,drop-only`" in advice
    recipe = (Path(__file__).parents[1] / "configs" / "llamacpp-drop-only.yaml").read_text()
    assert "plan: budget=decode=1.15,drop-only" in recipe and "budget=decode=1.15,drop-only" in (
        Path(__file__).parents[1] / "docs" / "engines.md").read_text()
    assert "LiSA" in serving_text(tmp_path, lisa)[0] and "vllm serve" not in " ".join(serving_text(tmp_path, lisa))


def test_vllm_refuses_what_it_cannot_run_exactly():
    crossing = EchoAttConfig(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                             attention_source=[0, 1, 1, 3], head_map=[None, None, [2, 3, 0, 1], None])
    check_servable(crossing, 2048, 1, 1)  # one device: served
    with pytest.raises(ValueError, match="tensor-parallel-size 1"):
        check_servable(crossing, 2048, 2, 1)
    with pytest.raises(ValueError, match="pipeline-parallel-size 1"):
        check_servable(crossing, 2048, 1, 2)
    with pytest.raises(ValueError, match="LiSA followers"):
        check_servable(EchoAttConfig(num_hidden_layers=4, attention_source=[0, 1, 1, 3], follower_type="lisa"),
                       2048, 1, 1)
    with pytest.raises(ValueError, match="FFN widths \\[102\\].*tensor-parallel-size 4"):
        check_servable(EchoAttConfig(num_hidden_layers=4, intermediate_sizes=[128, 102, 0, 128]), 2048, 4, 1)
    windowed = EchoAttConfig(num_hidden_layers=4, attention_source=[0, 1, -1, 3], context_window=512)
    check_servable(windowed, 512, 4, 1)  # drop-only: any tensor parallelism
    with pytest.raises(ValueError, match="pipeline-parallel-size 1"):  # echoatt's vLLM model has no pipeline stages
        check_servable(windowed, 512, 1, 2)
    with pytest.raises(ValueError, match="--max-model-len 512 or less"):
        check_servable(windowed, 1024, 1, 1)


def test_vllm_tensor_parallelism_sees_each_devices_heads():
    """An identity head map stored as a list is the identity on each device (not an H-long map against H / tp heads),
    and more devices than KV heads, which vLLM meets by replicating the leaders' KV heads, is refused for copy
    followers (their own V projection would be split instead)."""
    from echoatt.engines.vllm_serve import local_head_map

    listed = EchoAttConfig(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                           attention_source=[0, 1, 1, 3], head_map=[None, None, [0, 1, 2, 3], None])
    check_servable(listed, 2048, 2, 1)  # the identity, as a list: served on two devices
    assert local_head_map([0, 1, 2, 3], 4, 2) is None and local_head_map(None, 4, 2) is None
    assert local_head_map([1, 0, 3, 2], 4, 1) == [1, 0, 3, 2]
    with pytest.raises(ValueError, match="cannot be split"):
        local_head_map([1, 0, 3, 2], 4, 2)
    with pytest.raises(ValueError, match="--tensor-parallel-size 2 or less"):
        check_servable(listed, 2048, 4, 1)
    dropped = EchoAttConfig(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                            attention_source=[0, 1, -1, 3])
    check_servable(dropped, 2048, 4, 1)  # no follower: vLLM's own replication of KV heads is exact


def test_serve_cases_parse_and_refuse(capsys):
    assert parse_cases("prefill=64x512+1,ttft=1x512+1") == {
        "prefill": {"prompts": 64, "prompt_len": 512, "new_tokens": 1},
        "ttft": {"prompts": 1, "prompt_len": 512, "new_tokens": 1}}
    with pytest.raises(ValueError, match="NAME=PROMPTSxLENGTH"):
        parse_cases("prefill=64by512")
    assert main(["bench", "--engine", "vllm", "--serve-cases", "x=0x1+1"]) == 2
    assert "at least one prompt" in capsys.readouterr().err


def test_vllm_bounds_split_prefill_and_decode():
    teacher = tiny_teacher(0, "llama").config
    student = build_student(tiny_teacher(0, "llama"), SharingPlan(6, ((2, 3, 4),)), None, "drop").config
    mixed = case_bounds(teacher, student, {"prompts": 8, "prompt_len": 64, "new_tokens": 16}, 4)
    prefill = case_bounds(teacher, student, {"prompts": 8, "prompt_len": 64, "new_tokens": 1}, 4)
    assert set(mixed) == {"prefill", "decode"} and set(prefill) == {"prefill"}
    assert mixed["prefill"] == prefill["prefill"] > 1 and mixed["decode"] > 1


def test_vllm_bounds_count_the_keys_a_follower_caches_again():
    """In vLLM a copy follower caches the leader's keys again: decode moves as many KV bytes as an ordinary layer,
    H / Hkv times as many where the head map crosses KV groups (heads 0,1 share a KV head, as do 2,3)."""
    teacher = tiny_teacher(0, "llama")
    c = teacher.config
    B, P, w = 4, 64, 4
    kv_layer = 2 * c.num_key_value_heads * c.head_dim * w  # K and V of one layer, one token

    def decode(maps) -> tuple[float, int]:
        student = build_student(teacher, SharingPlan(6, ((2, 3),)), maps).config
        return forward_cost(student, B, 1, P, False, w, engine="vllm").bytes, kv_bytes_per_token(student, w)

    teacher_bytes = forward_cost(c, B, 1, P, False, w, engine="vllm").bytes
    (aligned, aligned_kv), (crossing, crossing_kv) = decode(None), decode([None] * 3 + [[2, 3, 0, 1]] + [None] * 2)
    q_k = c.hidden_size * (c.num_attention_heads + c.num_key_value_heads) * c.head_dim * w  # weights not read
    assert teacher_bytes - aligned == pytest.approx(q_k)  # the same KV bytes as the teacher's layer
    groups = c.num_attention_heads // c.num_key_value_heads
    assert crossing - aligned == pytest.approx((groups - 1) * B * (1 + P + 1) * kv_layer)  # written once, P+1 read
    assert aligned_kv == kv_bytes_per_token(c, w) == 6 * kv_layer and crossing_kv == 5 * kv_layer + groups * kv_layer
    assert kv_bytes_per_token(build_student(teacher, SharingPlan(6, ((2, 3),)), None, "drop").config, w) == 5 * kv_layer


@pytest.mark.parametrize("family", ["llama", "llama3", "qwen3"])
@pytest.mark.parametrize("plan", ["1-2", "drop=3", "linear=3", "drop=2,ffn=4:0"])
def test_serving_text_offers_an_engine_exactly_where_its_exporter_runs(tmp_path, family, plan):
    """The run's closing advice asks each exporter (`engines.support`), so it offers GGUF and DeciLM exactly where
    `check_expressible` and `block_configs` take the student (llama3 has scaled RoPE and biases: no GGUF)."""
    from echoatt.engines.decilm_export import block_configs
    from echoatt.engines.gguf_export import check_expressible

    config = build_student(tiny_teacher(family=family), SharingPlan.read(plan, 6)).config
    text = " ".join(serving_text(tmp_path, config))
    for export, offer in ((check_expressible, "--format gguf"), (block_configs, "DeciLM / Nemotron-NAS folder")):
        try:
            export(config)
            runs = True
        except PlanError:
            runs = False
        assert (offer in text) is runs, (family, plan, offer)

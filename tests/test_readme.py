"""The README is a user's page that tells the truth about the command line: short, every command and flag it names
exists, the defaults it states are the defaults, its links resolve, and its Python example is the one the tests run."""

from __future__ import annotations

import re
from pathlib import Path

from echoatt.cli import COMMANDS, parser
from echoatt.run.config import DistillConfig, RunConfig, ShareConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
OTHER_TOOLS = {"--serve", "--llamacpp", "--cuda", "--config_file", "--num_processes", "--trust-remote-code"}  # setup.sh,
# accelerate, vLLM


def test_the_readme_is_a_page_not_a_log():
    assert len(README.splitlines()) <= 300


def test_every_command_and_flag_it_names_exists():
    flags = {"--version", "--help"}
    subs = parser()._subparsers._group_actions[0].choices
    for sub in subs.values():
        flags |= {s for action in sub._actions for s in action.option_strings}
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", README))
    assert named - flags - OTHER_TOOLS == set()
    commands = set(re.findall(r"(?:`|bin/)echoatt ([a-z]+)", README))
    assert {"run", "share", "distill", "export"} <= commands <= set(COMMANDS), commands - set(COMMANDS)


def test_its_setup_flags_exist():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    for flag in ("--serve", "--llamacpp", "--cuda"):
        assert flag in README and (f'"{flag}"' in setup or f"{flag})" in setup), flag


def test_accelerate_commands_name_their_process_count():
    """The accelerate configs set no process count (a fixed 8 put two ranks on one GPU of a smaller machine, which
    NCCL refuses): every `accelerate launch` the docs and recipes show passes `--num_processes`."""
    for config in (ROOT / "configs" / "accelerate").glob("*.yaml"):
        assert not re.search(r"^num_processes:", config.read_text(), re.MULTILINE), config
    texts = [README, *(p.read_text() for p in [*(ROOT / "docs").glob("*.md"), *(ROOT / "configs").rglob("*.yaml")])]
    launches = [line for text in texts for line in text.replace("\\\n", " ").splitlines() if "accelerate launch" in line]
    assert launches and all("--num_processes" in line for line in launches), launches


def test_the_defaults_it_states_are_the_defaults():
    assert f"`--plan` (default `{ShareConfig.plan}`)" in README
    assert f"distilled {DistillConfig.steps} steps" in README
    assert f"`run` {RunConfig.limit} to stay CPU-sized" in README


def test_its_links_resolve():
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        assert (ROOT / link).exists(), link


def test_its_python_example_is_the_one_the_tests_run():
    block = README.split("```python\n", 1)[1].split("```", 1)[0]
    example = (ROOT / "examples" / "compress.py").read_text()
    for line in block.splitlines():
        code = line.split("#")[0].strip()
        if code and not code.startswith("result = echoatt.compress("):
            assert code in example, code
    assert 'echoatt.compress(teacher, recipe=recipe, out="runs/compress")' in example

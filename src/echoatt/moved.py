"""Where each module of the flat package went when it was grouped into rooms by concern: `import echoatt.planners`,
`from echoatt.student import build_student` and the other old paths in users' scripts keep working: each gives the
module in its room, the same object, not a copy."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

ROOMS = {
    "model": ("configuration_echoatt", "modeling_echoatt", "registration", "archs"),
    "planning": ("plan", "planners", "cost_model", "sensitivity", "analysis", "search"),
    "building": ("student", "calibrate", "repair"),
    "training": ("distill", "losses", "teacher_cache", "checkpoints", "memory", "precision"),
    "evaluation": ("harness", "metrics", "key_tokens", "bench", "report", "lm_eval_tasks"),
    "run": ("config", "rundir", "results"),
    "inputs": ("teacher", "corpus"),
}
MOVED = {f"echoatt.{name}": f"echoatt.{room}.{name}" for room, names in ROOMS.items() for name in names}


class OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path (`echoatt.planners`, or below it: `echoatt.lm_eval_tasks.olmo_data`) and hands back the
    module at its new one."""

    @staticmethod
    def new_name(name: str) -> str | None:
        head, _, rest = name.partition(".")
        top = f"{head}.{rest.partition('.')[0]}"
        return MOVED[top] + name[len(top):] if top in MOVED else None

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if self.new_name(name) else None

    def create_module(self, spec):
        return importlib.import_module(self.new_name(spec.name))

    def exec_module(self, module) -> None:
        """Nothing to run: the module ran when it was imported at its new path."""


def install() -> None:
    if not any(isinstance(finder, OldPaths) for finder in sys.meta_path):
        sys.meta_path.insert(0, OldPaths())  # before the path finders: an old path never loads a second copy

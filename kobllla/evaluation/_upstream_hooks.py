"""lm_eval's own task functions, compiled from its source without running their module's imports.

lm_eval resolves a task YAML's ``!function utils.f`` by importing the whole ``utils.py`` beside it, and
it does so for included files too. TruthfulQA's ``utils.py`` imports ``rouge_score`` (and with it nltk)
and sacrebleu for its generation task; MC2 needs only ``process_results_mc2``, which uses numpy. On the
2-core box that import was 0.69 s of an MC2 run. Here the function's definition is taken from the
installed lm_eval's file (so it is lm_eval's code, version for version) and compiled alone, with the
globals it names; a function that names anything else is refused, so a new lm_eval cannot silently get
a half-defined function. Task YAMLs point at these through ``kobllla_lm_eval_hooks.py``, written beside
them (``kobllla.evaluation._tasks.write_task_yamls``).
"""

from __future__ import annotations

import ast
import builtins
import functools
import symtable
from collections.abc import Callable

import numpy as np

HOOKS_MODULE = "kobllla_lm_eval_hooks"  # the module written beside the task YAMLs


def upstream_function(relpath: str, name: str, namespace: dict) -> Callable:
    """Function ``name`` of lm_eval's ``lm_eval/tasks/<relpath>``, compiled from its source alone,
    with ``namespace`` as its globals (every global name it uses must be there or a builtin)."""
    from kobllla.evaluation._tasks import upstream_tasks_dir

    path = upstream_tasks_dir() / relpath
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    if len(defs) != 1:
        raise ValueError(f"{path} defines {name} {len(defs)} times, expected once; lm_eval==0.4.13 is supported")
    code = compile(ast.Module(body=defs, type_ignores=[]), str(path), "exec")
    used = _global_names(ast.unparse(defs[0]), str(path))
    missing = sorted(used - set(namespace) - set(dir(builtins)))
    if missing:
        raise ValueError(f"{path}: {name} uses {', '.join(missing)}, which this copy does not provide; "
                         "lm_eval==0.4.13 is supported")
    scope = dict(namespace)
    exec(code, scope)  # noqa: S102 - lm_eval's own function definition, from its installed file
    fn = scope[name]
    fn.__module__ = f"lm_eval.tasks.{relpath.removesuffix('.py').replace('/', '.')}"
    return fn


def _global_names(source: str, filename: str) -> set[str]:
    """Names a function definition reads as globals (its own and its nested functions')."""
    names, todo = set(), list(symtable.symtable(source, filename, "exec").get_children())
    while todo:
        table = todo.pop()
        if isinstance(table, symtable.Function):
            names |= set(table.get_globals())
        todo += table.get_children()
    return names


def process_results_mc2(doc, results):
    """lm_eval's ``truthfulqa/utils.py`` ``process_results_mc2`` (compiled on first use)."""
    return _mc2()(doc, results)


@functools.cache
def _mc2() -> Callable:
    return upstream_function("truthfulqa/utils.py", "process_results_mc2", {"np": np})

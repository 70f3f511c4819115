"""The offline main job: the whole KoBLLa method on a mini model on CPU, with a report.

    from kobllla.demo import run_demo
    result = run_demo(Path("runs/demo"))   # python -m tools.demo --run-dir runs/demo
"""

from kobllla.demo._pipeline import StageFailed
from kobllla.demo._run import DemoResult, run_demo, train_all

__all__ = ["DemoResult", "StageFailed", "run_demo", "train_all"]

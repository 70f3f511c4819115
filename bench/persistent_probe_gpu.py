"""Which Triton kernels an RMSNorm's forward and backward compile to, with and without ``persistent_norms``.

    python bench/persistent_probe_gpu.py [--out probe.json]

Each case compiles in a fresh process (no thread has inductor choices yet; caches off) and prints one JSON
line per kernel with a row of the model's width (4,096): its heuristic (``reduction``: the row read in a
loop, twice; ``persistent_reduction``: read once), size hints and reduction hint, and one line (``decision``)
per time inductor asked whether a reduction should be persistent: the class that answered, the reduction
hint, the sizes, the answer and the thread that asked. Cases: ``test`` (the GPU
test's graph: the norm's output weighted and summed) and ``linear`` (as in a layer: the norm feeds a frozen
projection, so its backward sums that projection's input gradient along the row). GPU only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = r"""
import json, re, sys, torch
from torchtune.modules import RMSNorm
from torch._inductor.utils import run_and_get_code
which, case, grad_path = sys.argv[1], sys.argv[2], sys.argv[3]
import threading
from torch._inductor.choices import InductorChoices
from kobllla.models._persistent import PersistentRowChoices
def _logged(cls, attr):  # every persistence decision inductor asks for, printed as a JSON line
    orig = cls.__dict__[attr]
    fn = orig.__func__ if isinstance(orig, staticmethod) else orig
    def logged(*a):
        r = fn(*a)
        feat = a[-2]
        print(json.dumps({"decision": cls.__name__, "which": which, "case": case,
                          "hint": str(feat.get_reduction_hint()), "numel": str(feat.numel),
                          "rnumel": str(feat.reduction_numel), "persistent": bool(r),
                          "thread": threading.current_thread().name}), flush=True)
        return r
    setattr(cls, attr, staticmethod(logged) if isinstance(orig, staticmethod) else logged)
_logged(InductorChoices, "should_use_persistent_reduction")
_logged(PersistentRowChoices, "should_use_persistent_reduction")
if which == "ours":
    from kobllla.models._persistent import use_persistent_rows
    use_persistent_rows(4096)
norm = RMSNorm(4096).cuda().bfloat16().requires_grad_(False)
w = (torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16) * 0.02)
x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
def f(x):
    if case == "test":
        (norm(x).float() * torch.arange(4096, device="cuda")).sum().backward()
    else:
        (norm(x) @ w.t()).float().square().sum().backward()
    return x.grad
grad, code = run_and_get_code(torch.compile(f), x)
if grad_path:
    torch.save(grad.cpu(), grad_path)
pat = re.compile(r"@triton_heuristics\.(\w+)\(\s*size_hints=(\{[^}]*\}),\s*(?:reduction_hint=(ReductionHint\.\w+))?")
for i, src in enumerate(code):
    for kind, hints, rhint in pat.findall(src):
        if "4096" in hints:
            print(json.dumps({"which": which, "case": case, "graph": i, "kind": kind, "size_hints": hints,
                              "reduction_hint": rhint}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--which", default="stock,ours", help="comma-separated: stock, ours")
    p.add_argument("--cases", default="test,linear", help="comma-separated: test, linear")
    p.add_argument("--grads", default=None, help="a folder: each case's input gradient saved there as WHICH-CASE.pt")
    args = p.parse_args(argv)
    rows = probe(args.which.split(","), args.cases.split(","), grads=args.grads)
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 1 if any("error" in row for row in rows) else 0


def probe(which: list[str], cases: list[str], *, grads: str | None = None) -> list[dict]:
    """The kernels' rows (see the module docstring); a case whose process failed gives ``error``, its last lines."""
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    rows = []
    for case in cases:
        for one in which:
            grad = os.path.join(grads, f"{one}-{case}.pt") if grads else ""
            done = subprocess.run([sys.executable, "-c", _CHILD, one, case, grad], capture_output=True, text=True,
                                  env=env)
            if done.returncode:
                rows.append({"which": one, "case": case, "error": done.stderr.strip().splitlines()[-3:]})
            rows += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return rows


if __name__ == "__main__":
    sys.exit(main())

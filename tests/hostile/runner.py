"""Run hostile-input cases in a reusable worker process with a per-case timeout and a memory cap.

``python -m tests.hostile.runner [--code ROOT] [--timeout S]`` runs the whole corpus against the
``marginface`` of ROOT (default: this checkout) and prints one line per case and the totals by
outcome: ``clean`` (exit 2, one ``error:`` line naming the file, no traceback, no output left),
``traceback``, ``hang``, ``partial`` (output left behind), ``accepted`` (exit 0: the input was not
refused), ``unclear`` (refused, but not in one line naming the file).
"""
from __future__ import annotations

import json
import os
import resource
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

WORKER = Path(__file__).with_name("worker.py")
MEMORY_CAP = 6 << 30  # address space of the worker: a runaway allocation fails instead of swapping the box
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Outcome:
    rc: int | None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    hung: bool = False
    left: list = field(default_factory=list)


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


class Worker:
    def __init__(self, code_root: Path | None = None):
        self.code_root = Path(code_root or REPO)
        self.proc = None

    def _start(self):
        env = dict(os.environ, PYTHONPATH=str(self.code_root), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, preexec_fn=_limit_memory,
                                     text=True, bufsize=1)
        # wait for the imports, so that case timeouts measure the case alone
        if not select.select([self.proc.stdout], [], [], 180)[0] or self.proc.stdout.readline().strip() != "READY":
            self.stop()
            raise RuntimeError("the hostile-input worker did not start")

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, spec: dict, cwd: Path, timeout: float) -> Outcome:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        result = Path(tempfile.mkstemp(suffix=".json", dir=cwd)[1])
        request = {"argv": spec.get("argv"), "call": spec.get("call"), "cwd": str(cwd), "result": str(result)}
        start = time.monotonic()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        deadline = start + timeout
        while True:
            left = deadline - time.monotonic()
            ready = select.select([self.proc.stdout], [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                self.stop()
                result.unlink(missing_ok=True)
                return Outcome(None, seconds=time.monotonic() - start, hung=True)
            line = self.proc.stdout.readline()
            if not line:  # the worker died (killed by the memory cap, a crash in C code)
                self.proc = None
                result.unlink(missing_ok=True)
                return Outcome(-9, stderr="worker died", seconds=time.monotonic() - start)
            if line.strip() == "DONE":
                break
        data = json.loads(result.read_text())
        result.unlink()
        return Outcome(data["rc"], data["stdout"], data["stderr"], time.monotonic() - start)


def _one_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict) and len(text.strip().splitlines()) == 1
    except ValueError:
        return False


def classify(outcome: Outcome, names: list[str], accept: bool = False, json_out: bool = False) -> str:
    if outcome.hung:
        return "hang"
    if outcome.rc == 0 and accept and json_out and not _one_json_object(outcome.stdout):
        return "bad-json"
    if outcome.rc == 0:
        return "clean" if accept else "accepted"
    if outcome.left:
        return "partial"
    if "Traceback" in outcome.stderr or outcome.rc not in (0, 2):
        return "traceback"
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    if len(lines) == 1 and lines[0].startswith("error: ") and all(n in lines[0] for n in names):
        return "clean"
    return "unclear"


def run_case(worker: Worker, case, root: Path, timeout: float) -> tuple[str, Outcome, dict]:
    case_dir = root / case.name
    case_dir.mkdir(parents=True)
    spec = case.build(case_dir)
    outcome = worker.run(spec, case_dir, timeout)
    outcome.left = [str(p) for p in spec.get("outputs", []) if Path(p).exists()]
    verdict = classify(outcome, spec.get("names", []), spec.get("accept", False), spec.get("json", False))
    return verdict, outcome, spec


def main(argv=None) -> int:
    import argparse

    from tests.hostile.cases import CASES

    parser = argparse.ArgumentParser()
    parser.add_argument("--code", help="checkout whose marginface to run (default: this one)")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("-k", help="only cases whose name contains this")
    args = parser.parse_args(argv)
    worker = Worker(Path(args.code) if args.code else None)
    totals: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            if args.k and args.k not in case.name:
                continue
            verdict, outcome, _ = run_case(worker, case, Path(tmp), args.timeout)
            totals[verdict] = totals.get(verdict, 0) + 1
            last = (outcome.stderr.strip().splitlines() or [""])[-1][:150]
            print(f"{verdict:9s} {outcome.seconds:6.1f}s  {case.name:34s} rc={outcome.rc}  {last}", flush=True)
    worker.stop()
    print(f"cases {sum(totals.values())}: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

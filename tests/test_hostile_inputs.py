"""Every case of the hostile-input corpus (`tests/hostile/cases.py`) must end in one `error:` line
naming the file (exit 2), with no traceback, nothing half-written and within a time bound.

The cases run in one reusable worker process (torch imported once) with a per-case timeout and a
capped address space, so a hang or a runaway allocation fails the case instead of the machine.
``python -m tests.hostile.runner`` prints the same corpus as a table with totals.
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.hostile.cases import CASES, SHARED  # noqa: E402
from tests.hostile.runner import Worker, run_case  # noqa: E402

CASE_TIMEOUT = 25.0  # seconds; the slowest case (a verify: ONNX + MTCNN load) takes about 1 s alone


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.stop()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_is_refused_cleanly(case, worker, tmp_path):
    if case.needs_shared and not (SHARED / "weights").is_dir():
        pytest.skip(f"shared sample data {SHARED} is absent (set MARGINFACE_SHARED_DATA)")
    verdict, outcome, spec = run_case(worker, case, tmp_path, CASE_TIMEOUT)
    detail = f"rc={outcome.rc} after {outcome.seconds:.1f}s\nstderr:\n{outcome.stderr}\nstdout:\n{outcome.stdout[:500]}"
    assert not outcome.hung, f"{case.name}: no answer within {CASE_TIMEOUT}s (hang)"
    assert "Traceback" not in outcome.stderr, detail
    assert not outcome.left, f"{case.name}: left {outcome.left} behind\n{detail}"
    if spec.get("accept"):
        assert outcome.rc == 0, detail
        if spec.get("json"):
            assert json.loads(outcome.stdout) is not None and "NaN" not in outcome.stdout, detail
        assert verdict == "clean", detail
        return
    assert outcome.rc == 2, detail
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), detail
    for name in spec.get("names", []):
        assert name in lines[0], f"{case.name}: the error line does not name {name!r}\n{detail}"
    assert verdict == "clean"


def test_runner_tells_a_hang_from_a_clean_error(tmp_path):
    """The harness itself can fail: a case that sleeps is a hang, a traceback is a traceback."""
    from tests.hostile.cases import Case

    w = Worker()
    try:
        sleepy = Case("sleepy", lambda d: {"call": ["time:sleep", [30]], "names": []})
        verdict, outcome, _ = run_case(w, sleepy, tmp_path, 2.0)
        assert verdict == "hang" and outcome.hung
        boom = Case("boom", lambda d: {"call": ["json:loads", ["{"]], "names": []})
        verdict, outcome, _ = run_case(w, boom, tmp_path, 10.0)
        assert verdict == "traceback" and "Traceback" in outcome.stderr
    finally:
        w.stop()

"""`benchmarks/decision_digest.py`, the check that a change left every decision alone, works.

Two recordings of the same tree agree, and `--diff` reports a file whose
digest differs or that is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import decision_digest


def test_the_same_tree_twice_agrees_and_a_difference_is_found(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert decision_digest.main([str(out), "chat", "--duration-s", "3"]) == 0
    files = sorted(a.glob("*.json"))
    assert len(files) == len(list(decision_digest.builtin_policies())) > 1
    first = json.loads(files[0].read_text())
    assert first["_decisions_seen"] > 0
    assert decision_digest.main(["--diff", str(a), str(b)]) == 0

    changed = json.loads((b / files[0].name).read_text())
    changed["_decision_digest"] = "0" * 64
    (b / files[0].name).write_text(json.dumps(changed))
    assert decision_digest.main(["--diff", str(a), str(b)]) == 1
    (b / files[1].name).unlink()
    assert decision_digest.main(["--diff", str(a), str(b)]) == 1

"""The fault-injection script (tests/fault_injection.py) on a short run, one trial of each kind whose outcome
does not depend on timing: kill -9 at a random moment, a bit flip in a random checkpoint file, two runs on one
output directory. Many trials, and the signal kinds, are run by the script itself (docs/reliability.md)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_fault_injection_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tests" / "fault_injection.py"), "--trials", "1", "--steps", "12",
                             "--save-steps", "3", "--kinds", "kill,bitflip,overlap,stale", "--seed", "0",
                             "--timeout", "240", "--work", str(tmp_path / "work")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for kind in ("kill", "bitflip", "overlap", "stale"):
        assert f"{kind}" in result.stdout and "FAILED" not in result.stdout

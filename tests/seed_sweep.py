"""Run the property tests (or the whole suite) under many hypothesis seeds and count failures.

CI draws a fresh seed on every run (tests/conftest.py), so a bound that holds for most draws fails CI
at random. This script is the audit: it is not collected by pytest and is not part of CI's time.

    python tests/seed_sweep.py --seeds 0-29                  # tests marked `hypothesis`, 30 seeds
    python tests/seed_sweep.py --seeds 0-29 --all            # the whole suite, 30 seeds
    python tests/seed_sweep.py --seeds 1,9,13 -k logprobs    # pytest -k passes through
    HYPOTHESIS_PROFILE=thorough python tests/seed_sweep.py   # 300 examples per test instead of 25

Each seed runs in its own pytest process with --hypothesis-seed (which also bypasses the example
database, so earlier failures are not replayed); failures are listed with the seed that reproduces
them, and the totals (seeds x tests, failures) are printed at the end. Exit status 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            seeds.extend(range(int(lo), int(hi) + 1))
        elif part:
            seeds.append(int(part))
    return seeds


def run_seed(seed: int, args, xml_path: Path) -> tuple[int, list[str], float]:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--hypothesis-seed={seed}",
           f"--junitxml={xml_path}", "-q", "--no-header", "-rN"]
    if not args.all:
        cmd += ["-m", "hypothesis"]
    if args.k:
        cmd += ["-k", args.k]
    cmd += args.paths
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.time() - start
    if not xml_path.exists():
        sys.stdout.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"seed {seed}: pytest wrote no report (exit {proc.returncode})")
    tests, failed = 0, []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        tests += 1
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            name = f"{case.get('classname')}::{case.get('name')}"
            message = (problem.get("message") or "").splitlines()[0][:200]
            failed.append(f"{name}: {message}")
    if failed and args.show_output:
        sys.stdout.write(proc.stdout[-20000:])
    return tests, failed, elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0-29", help="comma-separated seeds and ranges (default 0-29)")
    parser.add_argument("--all", action="store_true", help="run the whole suite, not only property tests")
    parser.add_argument("-k", default=None, help="pytest -k expression")
    parser.add_argument("--show-output", action="store_true", help="print pytest's output for failing seeds")
    parser.add_argument("paths", nargs="*", default=[], help="test files or node ids (default: tests/)")
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds)
    total_tests = total_failed = 0
    failing: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            tests, failed, elapsed = run_seed(seed, args, Path(tmp) / f"seed{seed}.xml")
            total_tests += tests
            total_failed += len(failed)
            status = "ok" if not failed else f"{len(failed)} FAILED"
            print(f"seed {seed}: {tests} tests, {status} ({elapsed:.0f} s)", flush=True)
            for line in failed:
                print(f"    --hypothesis-seed={seed} {line}", flush=True)
                failing.append(f"--hypothesis-seed={seed} {line}")
    profile = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    print(f"\n{len(seeds)} seeds x {total_tests // max(len(seeds), 1)} tests (profile {profile!r}): "
          f"{total_tests} test runs, {total_failed} failed")
    return 1 if total_failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

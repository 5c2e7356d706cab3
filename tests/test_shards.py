"""Self-play over several ranks on CPU (gloo, the Hugging Face backend): the same bytes as one process, an uneven
split, per-shard resume after a rank is killed, one-line faults naming the rank and the stage."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nash_fast import shards

REPO = Path(__file__).resolve().parents[1]
# 7 training prompts, K = 2, generation batches of 4 rows: units of lcm(4, 2) / 2 = 2 prompts -> 4 units of
# 2, 2, 2, 1 prompts; 2 ranks get units {0, 1} (4 prompts) and {2, 3} (3 prompts): an uneven world of 2.
SMALL = ["--num-prompts", "7", "--eval-prompts", "2", "--eval-samples", "2", "--num-samples", "2",
         "--max-new-tokens", "6", "--iterations", "1", "--generation-batch-size", "4",
         "--train-args", "--max-steps 2 --plot false --save-steps 1000"]
ARTIFACTS = ("responses.jsonl", "judgments.jsonl", "dataset.jsonl")
LAUNCHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# A judge that wraps the offline judge, logs what each process judged, and on request kills its own rank
# (SIGKILL, no goodbye) or answers out of [0, 1] when it reaches a given prompt.
JUDGE_MODULE = textwrap.dedent(
    """
    import json, os, signal
    from nash_fast.judges import OfflineJudge

    _offline = OfflineJudge()

    def judge(prompts, first, second):
        rank = os.environ.get("RANK", "0")
        with open(os.environ["JUDGE_LOG"], "a") as f:
            for p in dict.fromkeys(prompts):
                f.write(json.dumps({"rank": rank, "prompt": p}) + "\\n")
        trap = os.environ.get("JUDGE_TRAP_PROMPT")
        if trap and rank == os.environ.get("JUDGE_TRAP_RANK") and trap in prompts:
            if os.environ.get("JUDGE_TRAP") == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            return [1.5] * len(prompts)
        return _offline.compare(prompts, first, second)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, world: int, output: str, *extra: str, env_extra: dict | None = None, timeout: float = 400):
    """`python -m nash_fast.selfplay` as `world` ranks (the variables torchrun sets), one thread each; returns
    [(exit status, stderr)] per rank. world=1: a plain process (no launcher)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), str(tmp_path), env.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", JUDGE_LOG=str(tmp_path / "judged.jsonl"), **(env_extra or {}))
    command = [sys.executable, "-m", "nash_fast.selfplay", "--output-dir", str(tmp_path / output), *SMALL, *extra]
    port = str(_free_port())
    procs = []
    for rank in range(world):
        rank_env = dict(env)
        if world > 1:
            rank_env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(command, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append((proc.returncode, err, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def error_line(err: str) -> str:
    """The one error line of a rank's stderr (other lines there are library warnings), and no traceback."""
    lines = [line for line in err.splitlines() if "nash_fast.selfplay: error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def judged(tmp_path) -> list[dict]:
    path = tmp_path / "judged.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    path.unlink(missing_ok=True)
    return rows


def test_units_and_assignment():
    assert shards.unit_size(64, 4) == 16 and shards.unit_size(64, 3) == 64 and shards.unit_size(4, 2) == 2
    assert [list(r) for r in shards.units(7, 2)] == [[0, 1], [2, 3], [4, 5], [6]]
    assert shards.assignment(4, [0, 1]) == {0: [0, 1], 1: [2, 3]}
    assert shards.assignment(3, [0, 1]) == {0: [0], 1: [1, 2]}
    assert shards.assignment(1, [0, 1, 2]) == {0: [], 1: [], 2: [0]}  # idle ranks are fine
    for n in range(0, 20):
        for w in range(1, 6):
            dealt = shards.assignment(n, list(range(w)))
            assert sorted(u for us in dealt.values() for u in us) == list(range(n))
            assert max(map(len, dealt.values())) - min(map(len, dealt.values())) <= 1


def test_a_shard_of_prompts_draws_the_samples_of_the_whole_list():
    """sample_seed(seed, i, k) with i the prompt's index in the whole list: a shard given its indices draws the same
    samples as the whole list does (one generation batch per prompt here, so batches hold the same rows)."""
    from nash_fast.generate import generate_responses
    from nash_fast.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer), seed=1)
    prompts = ["What is 19 + 74?", "Spell the word 'rapid' backwards.", "Name a colour."]
    options = dict(tokenizer=tokenizer, backend="hf", num_samples=2, max_new_tokens=6, seed=3, batch_size=2)
    whole = generate_responses(model, prompts, **options)
    assert generate_responses(model, prompts[2:], prompt_indices=[2], **options) == whole[2:]
    assert generate_responses(model, prompts[2:], **options) != whole[2:]  # index 0's seeds: other samples
    with pytest.raises(ValueError, match="prompt_indices has 2 entries for 1 prompts"):
        generate_responses(model, prompts[:1], prompt_indices=[0, 1], **options)


def test_two_ranks_write_the_same_bytes_as_one_and_a_killed_rank_redoes_only_its_shard(tmp_path):
    (tmp_path / "spy_judge.py").write_text(JUDGE_MODULE)
    judge = ["--judge", "callable:spy_judge:judge"]
    ((status, err, out),) = launch(tmp_path, 1, "one", *judge)
    assert status == 0, err[-3000:]
    one_judged = judged(tmp_path)

    # Two ranks; rank 1 dies (SIGKILL) when it reaches its second judge unit (prompt 6, unit 3) after writing
    # its first (unit 2). Rank 0 stops with one line naming rank 1 and the stage.
    prompts = [json.loads(line)["prompt"] for line in (tmp_path / "one" / "iter_1" / "responses.jsonl").open()]
    trap = {"JUDGE_TRAP": "kill", "JUDGE_TRAP_RANK": "1", "JUDGE_TRAP_PROMPT": prompts[6]}
    (status0, err0, _), (status1, _, _) = launch(tmp_path, 2, "two", *judge, env_extra=trap)
    assert status1 == -signal.SIGKILL and status0 == 1
    line = error_line(err0)
    assert "iteration 1 judge: rank 1 stopped" in line, line
    root = tmp_path / "two" / "iter_1"
    assert set(json.loads((root / "manifest.json").read_text())["stages"]) == {"generate"}
    records = {p.name: json.loads(p.read_text()) for p in (root / ".shards" / "judge").glob("shard-*.json")}
    assert sorted(records) == ["shard-00000.json", "shard-00001.json", "shard-00002.json"]  # unit 3 unfinished
    assert {r["rank"] for r in records.values()} == {0, 1}
    first = judged(tmp_path)
    assert {r["prompt"] for r in first if r["rank"] == "1"} == set(prompts[4:7])

    # The same command again: only unit 3 (prompt 6) is judged; generation is not redone.
    generated = (root / "responses.jsonl").stat().st_mtime_ns
    results = launch(tmp_path, 2, "two", *judge)
    assert [s for s, _, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert [r["prompt"] for r in judged(tmp_path)
            if r["prompt"] in prompts] == [prompts[6]]  # (the evaluation judges held-out prompts on rank 0)
    assert (root / "responses.jsonl").stat().st_mtime_ns == generated
    assert not (root / ".shards").exists() or not any((root / ".shards").iterdir())
    assert "[selfplay rank 1]" in results[1][2] and "1 of its 2 shards to do (1 kept" in results[1][2]

    # Byte-identical artifacts whatever the world size (and the interruption).
    for name in ARTIFACTS:
        assert (root / name).read_bytes() == (tmp_path / "one" / "iter_1" / name).read_bytes(), name
    for name in ("policy_1.jsonl", "policy_2.jsonl"):
        assert (tmp_path / "two" / "eval" / name).read_bytes() == (tmp_path / "one" / "eval" / name).read_bytes()
    manifest = json.loads((root / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"generate", "judge", "build", "train", "evaluate"}
    assert "--zero-stage" in manifest["stages"]["train"]["train_args"]  # every rank trained through DeepSpeed
    assert manifest["stages"]["judge"]["judge_queries"] == 7  # K (K - 1) / 2 = 1 per prompt
    assert (root / "train" / "final" / "config.json").is_file()
    assert len(one_judged) >= 7


def test_a_bad_judgment_on_one_rank_stops_every_rank_naming_the_prompt_and_the_rank(tmp_path):
    (tmp_path / "spy_judge.py").write_text(JUDGE_MODULE)
    prompt = "What is 19 + 74?"  # the shipped file's first prompt: unit 0, rank 0's
    trap = {"JUDGE_TRAP": "value", "JUDGE_TRAP_RANK": "0", "JUDGE_TRAP_PROMPT": prompt}
    results = launch(tmp_path, 2, "run", "--judge", "callable:spy_judge:judge", env_extra=trap)
    assert [s for s, _, _ in results] == [2, 1]  # rank 0: bad input (a ValueError); rank 1: the job failed
    for _, err, _ in results:
        line = error_line(err)
        assert f"rank 0 failed in iteration 1 judge: callable judge judge returned P(a > b) = 1.5 for prompt " \
               f"{prompt!r}" in line, line


def test_other_ranks_check_the_lock_rank_0_holds(tmp_path):
    holder = {"pid": 1, "host": "h", "job": "j"}
    (tmp_path / ".nash_fast.lock").write_text(json.dumps({**holder, "started": "x"}))
    shards.verify_lock(tmp_path, holder, 1)
    with pytest.raises(ValueError, match="rank 1 does not see the lock rank 0 holds for this job"):
        shards.verify_lock(tmp_path, {**holder, "job": "other"}, 1)
    with pytest.raises(ValueError, match="shared file system"):
        shards.verify_lock(tmp_path / "elsewhere", holder, 1)


def test_generation_engines_per_gpu_or_per_tensor_parallel_group(monkeypatch):
    from nash_fast import selfplay

    world = shards.World(rank=2, world_size=16, local_rank=2, local_world_size=8)
    assert selfplay.generation_workers(world, "hf", 2) == list(range(16))  # tensor parallelism is vLLM's
    assert selfplay.generation_workers(world, "vllm", 1) == list(range(16))  # one engine per GPU
    assert selfplay.generation_workers(world, "vllm", 2) == [0, 2, 4, 6, 8, 10, 12, 14]
    with pytest.raises(ValueError, match="--tensor-parallel-size 3 must divide the ranks per node"):
        selfplay.generation_workers(world, "vllm", 3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert selfplay._engine_devices(world, 2) == {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert selfplay._engine_devices(shards.World(rank=9, world_size=16, local_rank=1, local_world_size=8), 1) == \
        {"CUDA_VISIBLE_DEVICES": "1"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # a scheduler that shows each rank its own GPU only
    assert selfplay._engine_devices(shards.World(rank=3, world_size=8, local_rank=3, local_world_size=8), 1) == \
        {"CUDA_VISIBLE_DEVICES": "5"}
    assert selfplay._engine_devices(shards.World(), 2) == {}  # a world of one: vLLM sees what this process sees

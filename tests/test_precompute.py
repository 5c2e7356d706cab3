"""Precompute pass: packed forward-only log-probs equal a plain per-sequence HF forward; the disk cache hits on a
rerun and misses when the model, the data or a setting that changes the numbers changes."""

import copy
import json

import pytest
import torch

from nash_fast.data import load_tiny_preferences, tokenize_records
from nash_fast.precompute import (
    attach_logprobs,
    cached_sequence_logprobs,
    data_fingerprint,
    dataset_sequence_logprobs,
    model_fingerprint,
)
from nash_fast.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def examples(tokenizer):
    records = load_tiny_preferences()[:10]
    for record in records:
        record["aug_prompt"] = "Answer carefully: "
    return tokenize_records(tokenizer, records)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_model(len(tokenizer), seed=3)


def reference_logprob(model, prompt_ids, response_ids, average):
    """Independent: the full HF forward (logits over the vocabulary) of one unpacked sequence."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    start = len(prompt_ids)
    scores = [logp[start - 1 + k, token] for k, token in enumerate(response_ids)]
    total = torch.stack(scores).sum()
    return (total / len(response_ids) if average else total).item()


@pytest.mark.parametrize("augment, average", [(False, False), (True, True)])
def test_packed_precompute_matches_unpacked_forward(model, examples, augment, average):
    got = dataset_sequence_logprobs(model, examples, augment=augment, average=average, max_tokens=400, backend="torch")
    for example, values in zip(examples, got):
        prompts = [example["prompt_ids"]] * 2
        if augment:
            prompts += [example["aug_prompt_ids"] + example["prompt_ids"]] * 2
        responses = [example["chosen_ids"], example["rejected_ids"]] * (2 if augment else 1)
        expected = [reference_logprob(model, p, r, average) for p, r in zip(prompts, responses)]
        assert values == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_attach_names_fields_for_the_collator(examples):
    copies = copy.deepcopy(examples[:2])
    attach_logprobs(copies, [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], "ref_logps", augment=True)
    assert (copies[1]["chosen_ref_logps"], copies[1]["rejected_ref_logps"]) == (5.0, 6.0)
    assert (copies[1]["aug_chosen_ref_logps"], copies[1]["aug_rejected_ref_logps"]) == (7.0, 8.0)
    with pytest.raises(ValueError, match="example 0"):
        attach_logprobs(copies, [[1.0], [2.0]], "ref_logps", augment=False)


def test_cache_hit_on_rerun_and_miss_on_model_data_or_setting_change(tmp_path, tokenizer, examples):
    model_dir = tmp_path / "model"
    build_tiny_model(len(tokenizer), seed=5).save_pretrained(model_dir)
    loads = []

    def load():
        loads.append(1)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_dir)

    def run(data=examples, **overrides):
        kwargs = dict(cache_dir=tmp_path / "cache", max_tokens=400, backend="torch", settings={"dtype": "float32"})
        kwargs.update(overrides)
        return cached_sequence_logprobs("ref", str(model_dir), load, data, log=lambda m: None, **kwargs)

    first, hit = run()
    assert not hit and len(loads) == 1
    again, hit = run()
    assert hit and again == first
    assert len(loads) == 1, "a cache hit on a local model directory must not load the model"

    changed_data = copy.deepcopy(examples)
    changed_data[3]["chosen_ids"] = changed_data[3]["chosen_ids"][:-1] + [7]
    values, hit = run(changed_data)
    assert not hit and values[3] != first[3] and values[0] == first[0]
    assert run(changed_data)[1]

    assert not run(average=True)[1]
    assert not run(settings={"dtype": "bfloat16"})[1]

    # Different weights under the same path: a miss, and new numbers.
    build_tiny_model(len(tokenizer), seed=6).save_pretrained(model_dir)
    values, hit = run()
    assert not hit and values != first

    # A damaged cache file is recomputed, not trusted.
    for path in (tmp_path / "cache").glob("*.pt"):
        path.write_bytes(b"garbage")
    values2, hit = run()
    assert not hit and values2 == values


def test_fingerprints(tmp_path, tokenizer, examples):
    a = build_tiny_model(len(tokenizer), seed=1)
    b = build_tiny_model(len(tokenizer), seed=2)
    assert model_fingerprint("tiny", a) == model_fingerprint("tiny", build_tiny_model(len(tokenizer), seed=1))
    assert model_fingerprint("tiny", a) != model_fingerprint("tiny", b)
    a.save_pretrained(tmp_path / "a")
    assert model_fingerprint(str(tmp_path / "a")) == model_fingerprint(str(tmp_path / "a"))
    b.save_pretrained(tmp_path / "a")
    first = model_fingerprint(str(tmp_path / "a"))
    a.save_pretrained(tmp_path / "a")
    assert model_fingerprint(str(tmp_path / "a")) != first
    # The hash memo: a second fingerprint reads the memo, and a rewritten file (new mtime) is hashed again.
    memo = tmp_path / "memo.json"
    first = model_fingerprint(str(tmp_path / "a"), memo_file=memo)
    assert json.loads(memo.read_text()) and model_fingerprint(str(tmp_path / "a"), memo_file=memo) == first
    b.save_pretrained(tmp_path / "a")
    assert model_fingerprint(str(tmp_path / "a"), memo_file=memo) == model_fingerprint(str(tmp_path / "a")) != first
    assert data_fingerprint(examples, augment=False) != data_fingerprint(examples, augment=True)
    assert data_fingerprint(examples, augment=False) != data_fingerprint(examples[::-1], augment=False)


# ------------------------------------------------------------------ verified, resumable cache

def _flip(path, bit):
    data = bytearray(path.read_bytes())
    data[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))


def test_cache_files_are_verified_before_use(tmp_path, tokenizer, examples):
    """Every cache file carries a SHA-256 sidecar: a flipped bit, a missing sidecar or a file swapped for another
    cache file all make a miss and a recomputation with the same numbers; nothing unverified is loaded."""
    from nash_fast.rundir import sha256_file

    messages = []

    def run():
        return cached_sequence_logprobs("ref", "tiny", lambda: build_tiny_model(len(tokenizer), seed=3), examples,
                                        cache_dir=tmp_path, max_tokens=400, backend="torch", log=messages.append)

    first, hit = run()
    (path,) = tmp_path.glob("ref-logps-*.pt")
    sidecar = json.loads(path.with_name(path.name + ".sha256").read_text())
    assert not hit and sidecar == {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    assert run() == (first, True)
    for bit in (0, 8 * path.stat().st_size // 2, 8 * path.stat().st_size - 1):
        _flip(path, bit)
        messages.clear()
        assert run() == (first, False)
        assert any(f"not using cache file {path}" in m and "SHA-256 does not match" in m for m in messages)
    path.with_name(path.name + ".sha256").unlink()
    assert run() == (first, False)
    other = tmp_path / "other"
    cached_sequence_logprobs("ref", "tiny", lambda: build_tiny_model(len(tokenizer), seed=4), examples,
                             cache_dir=other, max_tokens=400, backend="torch", log=lambda m: None)
    shutil_copy = __import__("shutil").copy
    shutil_copy(next(other.glob("ref-logps-*.pt")), path)  # another valid cache file under this name
    assert run() == (first, False)


def test_interrupted_pass_keeps_its_shards_and_resumes_exactly(tmp_path, tokenizer, examples, monkeypatch):
    """A stop after two batches writes them as verified shards and raises Interrupted; the rerun computes only
    the other batches, in the same packing, so its numbers are those of an uninterrupted pass, bit for bit."""
    import nash_fast.precompute as precompute
    from nash_fast.interrupt import Interrupted

    model = build_tiny_model(len(tokenizer), seed=3)
    straight = dataset_sequence_logprobs(model, examples, max_tokens=200, backend="torch")
    monkeypatch.setattr(precompute, "SHARD_BATCHES", 1)
    computed = []
    real = precompute.packed_sequence_logprobs

    def counting(*args, **kwargs):
        computed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(precompute, "packed_sequence_logprobs", counting)
    stops = iter([None, "SIGTERM"])

    def run(stop=None):
        return cached_sequence_logprobs("ref", "tiny", lambda: model, examples, cache_dir=tmp_path, max_tokens=200,
                                        backend="torch", log=lambda m: None, stop=stop)

    with pytest.raises(Interrupted, match=r"precompute ref: 2 of (\d+) batches done and kept") as stopped:
        run(stop=lambda: next(stops))
    total = int(stopped.value.args[0].split(" of ")[1].split()[0])
    assert total > 2 and stopped.value.signal_name == "SIGTERM"
    shards = sorted(tmp_path.glob("ref-logps-*.partial-200/shard-*.pt"))
    assert len(shards) == 2 and all(s.with_name(s.name + ".sha256").is_file() for s in shards)
    # A damaged shard is not trusted: its batch is computed again.
    _flip(shards[1], 8 * shards[1].stat().st_size // 2)
    computed.clear()
    values, hit = run()
    assert not hit and len(computed) == total - 1
    assert values == straight
    assert not list(tmp_path.glob("*.partial-*"))  # merged into the cache file and removed
    assert run() == (straight, True)

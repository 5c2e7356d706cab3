"""Sample K responses per prompt from a policy: vLLM on a GPU when installed, Hugging Face otherwise.

    groups = generate_responses("path/to/policy", prompts, num_samples=4, temperature=1.0, top_p=1.0,
                                max_new_tokens=128, seed=0)        # list (per prompt) of K strings

    python -m nash_fast.generate --model PATH --prompts prompts.jsonl --output responses.jsonl -K 4

Every sample (prompt i, sample k) has its own seed, sample_seed(seed, i, k), so a response does not depend
on which other prompts share its batch, on the batch size or on the backend's scheduling (vLLM:
SamplingParams(seed=...); Hugging Face: one torch.Generator per row, on the model's device, in a
batched, KV-cached sampling loop, since model.generate draws every row from one generator). The same
seed gives the same sample on the same backend and device type. Prompts are rendered exactly as the
trainer renders them (nash_fast.data.tokenize_prompt: the chat template with the generation prompt when
the tokenizer has one), so the policy is sampled from and trained on the same prompt tokens.
A response is the decoded text of the new tokens up to (not including) the first end-of-sequence token
(special tokens skipped); the trainer re-tokenizes that text. Its length is the number of tokens generated
(the end-of-sequence token not counted: at most max_new_tokens), returned with return_token_counts=True; decoding
and re-tokenizing a text need not give back as many tokens.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from nash_fast import rundir
from nash_fast.cli import ArgumentParser, run_cli
from nash_fast.data import apply_chat_template_option, load_jsonl, tokenize_prompt
from nash_fast.pretrained import resolve_model

BACKENDS = ("auto", "hf", "vllm")


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of sample k of prompt i: a hash of (seed, i, k) into [0, 2^31)."""
    state = np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(1)[0]
    return int(state) & 0x7FFFFFFF


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        has_vllm = importlib.util.find_spec("vllm") is not None
        return "vllm" if has_vllm and torch.cuda.is_available() else "hf"
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("backend='vllm' but vllm is not installed (pip install 'nash-fast[vllm]')")
    return backend


def _check(num_samples, temperature, top_p, max_new_tokens):
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids


def _filter_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose mass reaches top_p."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def _cache_argument(model) -> str:
    """The name under which model.forward takes the KV cache: 'cache' in transformers 5.x (which deprecates
    'past_key_values' with a FutureWarning), 'past_key_values' before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def hf_sample(model, tokenizer, prompt_ids: Sequence[Sequence[int]], seeds: Sequence[int], *, temperature: float,
              top_p: float, max_new_tokens: int, batch_size: int = 16) -> list[list[int]]:
    """Sample one continuation per row (token ids, end-of-sequence excluded), row r drawn with seeds[r]."""
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cache_argument = _cache_argument(model)
    results: list[list[int]] = []
    for start in range(0, len(prompt_ids), batch_size):
        rows = [list(r) for r in prompt_ids[start:start + batch_size]]
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds[start:start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):  # left padding: every row's next token is in the last column
            ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        ids, mask = ids.to(device), mask.to(device)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1)
        new = [[] for _ in rows]
        done = [False] * len(rows)
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1].float()
            if temperature == 0:
                tokens = logits.argmax(-1).tolist()
            else:
                probs = _filter_top_p(torch.softmax(logits / temperature, dim=-1), top_p)
                tokens = [int(torch.multinomial(probs[r], 1, generator=generators[r])) for r in range(len(rows))]
            for r, token in enumerate(tokens):
                if not done[r]:
                    if token in eos:
                        done[r] = True
                    else:
                        new[r].append(token)
            if all(done):
                break
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=device)], dim=1)
            position = position[:, -1:] + 1
            step_ids = torch.tensor(tokens, device=device)[:, None]
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=position,
                        **{cache_argument: getattr(out, cache_argument)}, use_cache=True)
        results.extend(new)
    return results


def _vllm_generate(model_path, prompt_ids, seeds, *, temperature, top_p, max_new_tokens, tensor_parallel_size,
                   gpu_memory_utilization, eos_ids) -> tuple[list[str], list[int]]:
    """(texts, generated token counts); vLLM's token_ids end with the end-of-sequence token when it stopped on one,
    which is not counted (as in hf_sample)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_path), tensor_parallel_size=tensor_parallel_size, seed=0,
              gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True)
    params = [SamplingParams(n=1, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=s,
                             skip_special_tokens=True) for s in seeds]
    outputs = llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], params, use_tqdm=False)
    counts = []
    for o in outputs:
        ids = list(o.outputs[0].token_ids)
        counts.append(len(ids) - (1 if ids and ids[-1] in eos_ids else 0))
    return [o.outputs[0].text for o in outputs], counts


def generate_responses(model, prompts: Sequence[str | list[dict]], *, num_samples: int, temperature: float = 1.0,
                       top_p: float = 1.0, max_new_tokens: int = 128, seed: int = 0, tokenizer=None,
                       use_chat_template: bool | None = None, chat_template: str | None = None,
                       backend: str = "auto", tensor_parallel_size: int = 1, batch_size: int = 16,
                       gpu_memory_utilization: float = 0.85, return_token_counts: bool = False,
                       prompt_indices: Sequence[int] | None = None):
    """K = num_samples responses for each prompt (a string, or a conversation: a list of {role, content}
    messages) from `model` (a path, or a loaded causal LM for the Hugging Face backend, with `tokenizer`).
    chat_template is a --chat-template option (auto / on / off / a template) and overrides use_chat_template.
    prompt_indices: the index i of each prompt in sample_seed(seed, i, k) (default 0, 1, ...), so that a shard of
    a larger prompt list draws the same samples as the whole list.
    Returns one list of K strings per prompt; with return_token_counts=True, (those lists, the same lists of
    each response's generated token count, end-of-sequence not counted)."""
    _check(num_samples, temperature, top_p, max_new_tokens)
    if prompt_indices is None:
        prompt_indices = range(len(prompts))
    elif len(prompt_indices) != len(prompts):
        raise ValueError(f"prompt_indices has {len(prompt_indices)} entries for {len(prompts)} prompts")
    backend = resolve_backend(backend)
    if isinstance(model, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(model))
    elif tokenizer is None or backend == "vllm":
        raise ValueError("a loaded model needs tokenizer=... and the Hugging Face backend (vLLM loads from a path)")
    if chat_template is not None:
        use_chat_template = apply_chat_template_option(tokenizer, chat_template)
    rows = [(i, k) for i in range(len(prompts)) for k in range(num_samples)]
    encoded = [tokenize_prompt(tokenizer, p, use_chat_template=use_chat_template) for p in prompts]
    prompt_ids = [encoded[i] for i, _ in rows]
    seeds = [sample_seed(seed, prompt_indices[i], k) for i, k in rows]
    if backend == "vllm":
        from transformers import GenerationConfig

        try:
            generation_eos = GenerationConfig.from_pretrained(str(model)).eos_token_id
        except OSError:  # no generation_config.json
            generation_eos = None
        eos_ids = {tokenizer.eos_token_id} | set(generation_eos if isinstance(generation_eos, list) else [generation_eos])
        texts, counts = _vllm_generate(model, prompt_ids, seeds, temperature=temperature, top_p=top_p,
                                       max_new_tokens=max_new_tokens, tensor_parallel_size=tensor_parallel_size,
                                       gpu_memory_utilization=gpu_memory_utilization, eos_ids=eos_ids - {None})
    else:
        if isinstance(model, (str, Path)):
            from transformers import AutoModelForCausalLM

            device = "cuda" if torch.cuda.is_available() else "cpu"
            model = AutoModelForCausalLM.from_pretrained(str(model), dtype="auto").to(device).eval()
        tokens = hf_sample(model, tokenizer, prompt_ids, seeds, temperature=temperature, top_p=top_p,
                           max_new_tokens=max_new_tokens, batch_size=batch_size)
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        counts = [len(t) for t in tokens]
    groups = [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]
    if return_token_counts:
        return groups, [counts[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]
    return groups


PROG = "python -m nash_fast.generate"


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI (one-line errors, exit status 2; --debug for a traceback)."""
    return run_cli(PROG, _main, argv)


def _main(argv: list[str]) -> int:
    parser = ArgumentParser(prog=PROG, description="Sample K responses per prompt (jsonl with a 'prompt' field: a "
                            "string or a list of {role, content} messages, and optionally an integer 'index': the "
                            "prompt's i in the sample seeds, default its line number from 0).")
    parser.add_argument("--model", required=True, help="Hugging Face directory or hub name, a GGUF file, or "
                        "smollm2-135m-instruct")
    parser.add_argument("--prompts", required=True, help="jsonl file, one {'prompt': ...} per line")
    parser.add_argument("--output", required=True, help="jsonl file: {'prompt', 'responses', 'response_tokens'} per "
                        "line (response_tokens: each response's generated token count)")
    parser.add_argument("-K", "--num-samples", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat-template", default="auto", help="auto, on, off, or a template (a .jinja file, a "
                        "tokenizer directory, or the Jinja text)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--debug", action="store_true", help="Print the full traceback of an error.")
    args = parser.parse_args(argv)
    if not Path(args.prompts).is_file():
        raise ValueError(f"--prompts {args.prompts}: no such file")
    args.model = resolve_model(args.model)  # a GGUF model: its converted directory (nash_fast.pretrained)
    prompts, indices = [], []
    for line, row in enumerate(load_jsonl(args.prompts), 1):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), (str, list)):
            raise ValueError(f"--prompts {args.prompts}: record {line} has no field 'prompt' (a string or a list "
                             "of {role, content} messages)")
        index = row.get("index", line - 1)
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValueError(f"--prompts {args.prompts}: record {line}: 'index' must be a non-negative integer, "
                             f"got {index!r}")
        prompts.append(row["prompt"])
        indices.append(index)
    groups, counts = generate_responses(
        args.model, prompts, num_samples=args.num_samples, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, seed=args.seed, backend=args.backend,
        chat_template=args.chat_template,
        tensor_parallel_size=args.tensor_parallel_size, batch_size=args.batch_size, return_token_counts=True,
        prompt_indices=indices)
    with rundir.atomic_file(args.output) as tmp, open(tmp, "w") as f:
        for prompt, responses, tokens in zip(prompts, groups, counts):
            f.write(json.dumps({"prompt": prompt, "responses": responses, "response_tokens": tokens}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

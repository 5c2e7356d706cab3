"""Token-budget batching: batches hold at most max_tokens tokens, never a fixed number of pairs.

A pair (all of its sequences, augmented ones included) or a K-response group is the unit of batching and is
never split. Length-aware grouping: the epoch's shuffled order is cut into buckets of `bucket_size` examples,
each bucket is sorted by length, and batches are filled greedily in that order, so a batch holds examples of
similar length (steadier step time; a padded layout of the same batch would also waste less). The batch
order is then shuffled.

    lengths = [example_sequence_lengths(e, i, augment=aug) for i, e in enumerate(examples)]
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=8192, seed=0)
    loader = DataLoader(examples, batch_sampler=sampler, collate_fn=PackedPreferenceCollator(augment=aug))
    sampler.stats()   # tokens per batch, budget use, and the padding fraction a padded layout would have had
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch


class TokenBudgetBatchSampler(torch.utils.data.Sampler):
    """Yields lists of example indices whose total token count is <= max_tokens.

    example_lengths[i]: the sequence lengths of example i (e.g. example_sequence_lengths); the example costs
        their sum. An example longer than max_tokens raises ValueError naming it (nothing is truncated).
    Distributed: with num_replicas > 1, rank r takes batches r, r + n, ...; when the batch count does not divide
    evenly the first batches are reused (like torch's DistributedSampler) so every rank runs the same number
    of steps. Call set_epoch(e) each epoch for a new order.
    """

    def __init__(
        self,
        example_lengths: Sequence[Sequence[int]],
        max_tokens: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        bucket_size: int = 512,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if not isinstance(bucket_size, int) or bucket_size <= 0:
            raise ValueError(f"bucket_size must be a positive int, got {bucket_size!r}")
        if not (isinstance(num_replicas, int) and num_replicas >= 1 and isinstance(rank, int) and 0 <= rank < num_replicas):
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank!r}, num_replicas={num_replicas!r}")
        if len(example_lengths) == 0:
            raise ValueError("example_lengths is empty")
        self.sequence_lengths: list[list[int]] = []
        for i, lengths in enumerate(example_lengths):
            if isinstance(lengths, int) or not lengths:
                raise ValueError(f"example {i}: example_lengths[{i}] must be a non-empty list of sequence lengths")
            if any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in lengths):
                raise ValueError(f"example {i}: sequence lengths must be positive ints, got {list(lengths)!r}")
            if sum(lengths) > max_tokens:
                raise ValueError(
                    f"example {i}: its {len(lengths)} sequences hold {sum(lengths)} tokens, more than "
                    f"max_tokens={max_tokens}; raise max_tokens or drop/shorten the example (nothing is truncated)"
                )
            self.sequence_lengths.append(list(lengths))
        self.tokens = [sum(lengths) for lengths in self.sequence_lengths]
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.bucket_size = bucket_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def all_batches(self) -> list[list[int]]:
        """Every batch of this epoch (all ranks), before distributed splitting."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self.tokens)
        order = torch.randperm(n, generator=generator).tolist() if self.shuffle else list(range(n))
        batches, batch, batch_tokens = [], [], 0
        for start in range(0, n, self.bucket_size):
            bucket = sorted(order[start : start + self.bucket_size], key=lambda i: self.tokens[i])
            for i in bucket:
                if batch and batch_tokens + self.tokens[i] > self.max_tokens:
                    batches.append(batch)
                    batch, batch_tokens = [], 0
                batch.append(i)
                batch_tokens += self.tokens[i]
        if batch:
            batches.append(batch)
        if self.shuffle:
            batches = [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def _rank_batches(self) -> list[list[int]]:
        batches = self.all_batches()
        if self.num_replicas > 1:
            per_rank = -(-len(batches) // self.num_replicas)
            batches = (batches * self.num_replicas)[: per_rank * self.num_replicas]
            batches = batches[self.rank :: self.num_replicas]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._rank_batches())

    def __len__(self) -> int:
        return len(self._rank_batches())

    def batch_stats(self, batch: Sequence[int]) -> dict:
        """tokens, sequences, max_seqlen, budget_fraction (tokens / max_tokens) and padding_fraction: the share
        of a padded [sequences, max_seqlen] layout of this batch that would be padding (packing wastes none)."""
        lengths = [n for i in batch for n in self.sequence_lengths[i]]
        tokens = sum(lengths)
        padded = len(lengths) * max(lengths)
        return {
            "tokens": tokens,
            "sequences": len(lengths),
            "max_seqlen": max(lengths),
            "budget_fraction": tokens / self.max_tokens,
            "padding_fraction": 1.0 - tokens / padded,
        }

    def stats(self) -> dict:
        """This rank's epoch: number of batches, tokens per batch (list, mean), mean budget use and the overall
        padding fraction a padded layout of the same batches would have had."""
        per_batch = [self.batch_stats(b) for b in self._rank_batches()]
        tokens = [s["tokens"] for s in per_batch]
        padded = sum(s["sequences"] * s["max_seqlen"] for s in per_batch)
        return {
            "batches": len(per_batch),
            "tokens_per_batch": tokens,
            "mean_tokens_per_batch": sum(tokens) / len(tokens),
            "mean_budget_fraction": sum(s["budget_fraction"] for s in per_batch) / len(per_batch),
            "padding_fraction": 1.0 - sum(tokens) / padded,
        }


class BatchStream:
    """The run's endless sequence of global micro-batches: epoch 0's token-budget batches, then epoch 1's, ...
    Global micro-batch p is a list of example indices; epochs are shuffled with seed + epoch."""

    def __init__(self, sampler):
        self.sampler = sampler
        self._epochs: dict[int, list[list[int]]] = {}
        self._starts = [0]  # _starts[e] = global index of epoch e's first batch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            self.sampler.set_epoch(epoch)
            self._epochs = {epoch: self.sampler.all_batches(), **{k: v for k, v in self._epochs.items() if k >= epoch - 1}}
        return self._epochs[epoch]

    def epoch_start(self, epoch: int) -> int:
        while len(self._starts) <= epoch:
            e = len(self._starts) - 1
            self._starts.append(self._starts[e] + len(self.epoch_batches(e)))
        return self._starts[epoch]

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, index within the epoch) of global micro-batch `position`."""
        epoch = 0
        while self.epoch_start(epoch + 1) <= position:
            epoch += 1
        return epoch, position - self.epoch_start(epoch)

    def batch(self, position: int) -> list[int]:
        epoch, index = self.locate(position)
        return self.epoch_batches(epoch)[index]

    def micro_batches_for_epochs(self, num_epochs: float) -> int:
        whole = int(num_epochs)
        total = self.epoch_start(whole)
        fraction = num_epochs - whole
        if fraction > 0:
            total += math.ceil(fraction * len(self.epoch_batches(whole)))
        return total

"""The embedding and the LM head, split across tensor-parallel ranks by vocabulary (introduced in chapter 04).

Both are [vocab, hidden] matrices, the largest of a small model (SmolLM2: 49152 x 576, a fifth of its
weights), so each rank holds a contiguous block of the vocabulary's rows: rank r holds tokens
``r * rows .. (r + 1) * rows - 1``.

- **embedding**: a rank can look up only the tokens of its block. It looks those up, writes zeros for
  the others, and an all-reduce adds the ranks' answers: every token was found by exactly one rank.
- **LM head**: each rank scores the tokens of its block, and an all-gather lays the blocks side by side
  in rank order, which is the vocabulary's order. Every rank gets the logits of the whole vocabulary,
  so every rank samples the same token (the scheduler gives each request the same seed on every rank).

Both split the vocabulary the same way, so a model with tied embeddings scores with its embedding's
block as it is. A vocabulary that the ranks do not divide is padded up to a multiple of the TP size:
the last rank's block ends with zero rows that no token id reaches, and the logits of that padding are
cut off after the all-gather, so the LM head always returns exactly ``vocab_size`` logits.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_gather, all_reduce, tp_info
from .linear import Shard, linear


# --8<-- [start:vocab-embedding]
class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        tp = tp_info()
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // tp.size)  # ceil: the last block may end with padding
        self.start = tp.rank * self.rows  # the first token id of this rank's block
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [tokens] -> [tokens, hidden]: the embedding of each token, on every rank."""
        # --8<-- [start:ex-vocab-embedding]
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)  # another rank's tokens
        # Look up row 0 for those (any valid row would do), then zero them: their own rank adds them in.
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(x.masked_fill(outside.unsqueeze(-1), 0.0))
        # --8<-- [end:ex-vocab-embedding]

    def shard(self) -> Shard:
        return Shard(self.weight.data, (self.vocab_size, self.weight.shape[1]), dim=0, start=self.start)
# --8<-- [end:vocab-embedding]

    # --8<-- [start:lm-head]
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [tokens, hidden] -> logits [tokens, vocab_size] over the whole vocabulary, on every rank.

        The LM head's job, done with this weight: a tied model scores with its embedding's block as is.
        """
        logits = linear(hidden, self.weight)  # [tokens, rows]: this rank's block of the vocabulary
        return all_gather(logits, dim=-1)[:, : self.vocab_size]  # blocks in rank order, padding cut off
    # --8<-- [end:lm-head]


class ParallelLMHead(VocabParallelEmbedding):
    """The LM head of a model without tied embeddings: a weight of its own, split like the embedding's."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits(hidden)

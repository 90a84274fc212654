"""The attackers: what a node holding the public model could do with the hidden states it receives.

Prefix side (the node sees h = layers[0, d)(embed(prompt)) and wants the prompt's tokens):
- `nearest`: each vocabulary token pushed alone through layers [0, d) (`propagate`), the observed state's
  nearest row by cosine. At d = 0 that is the embedding table itself.
- `Inverter`: a ridge-regression map from hidden states at depth d, in context, to the tokens' states alone
  (the table `nearest` searches), fitted on the attacker's own text, decoded by the nearest row (the
  learned inverter of the papers: it learns what the context adds and takes it away).
- `sipit`: SipIt's search (arXiv 2510.15511), position by position: given the prefix recovered so far, the
  candidate token whose hidden state reproduces the observed one. Candidates come ranked from the two
  above, so its reach is bounded by how many it may try.

Suffix side (the node before the gateway's last s layers sees h = layers[0, L - s)(...) and wants the
answer, i.e. the gateway's next token): `head` read off h directly (the logit lens), after a fitted map to
the last layer (a tuned lens, `Inverter` again), or after running the public last layers itself.
"""

from collections.abc import Iterator, Sequence

import torch

from duskpool.audit.batching import BatchOps
from duskpool.models import SpanModel

CHUNK_ROWS = 2048  # vocabulary rows per batch when the table is pushed through a layer


def embedding_table(edge: SpanModel, vocab_size: int) -> torch.Tensor:
    """Every token's embedding [vocab, dim]."""
    return torch.cat([edge.embed(range(a, min(a + CHUNK_ROWS, vocab_size)))
                      for a in range(0, vocab_size, CHUNK_ROWS)])


def propagate(table: torch.Tensor, layers: Sequence[SpanModel], ops: BatchOps) -> Iterator[torch.Tensor]:
    """The table [vocab, dim] after each of `layers` in turn, each row a token alone at position 0."""
    for layer in layers:
        cache = layer.new_cache(CHUNK_ROWS)
        with ops.alternatives():
            table = torch.cat([layer.forward_span(table[a:a + CHUNK_ROWS], cache, 0)
                               for a in range(0, table.shape[0], CHUNK_ROWS)])
        yield table


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def nearest(observed: torch.Tensor, table: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of `table` nearest each observed state [N, dim] by cosine: token ids [N, k], best first."""
    table = unit(table)
    return torch.cat([(unit(observed[a:a + 256]) @ table.T).topk(k, dim=-1).indices
                      for a in range(0, observed.shape[0], 256)])


class Inverter:
    """A ridge-regression map x [N, dim] -> y [N, out] on standardized features with a bias; the ridge is the
    one of `RIDGES` that best predicts a fifth of the attacker's own data from the rest."""

    RIDGES = (1e-6, 1e-4, 1e-2, 1.0)

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        x, y = x.double(), y.double()
        self.mean, self.scale = x.mean(0), x.std(0).clamp_min(1e-6)
        features = self._features(x)
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
        fit, check = order[x.shape[0] // 5:], order[:x.shape[0] // 5]
        errors = {r: float((features[check] @ self._solve(features[fit], y[fit], r) - y[check]).pow(2).mean())
                  for r in self.RIDGES}
        self.ridge = min(errors, key=errors.get)
        self.weight = self._solve(features, y, self.ridge)

    @staticmethod
    def _solve(features: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
        gram = features.T @ features
        gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        return torch.linalg.solve(gram, features.T @ y)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.double() - self.mean) / self.scale
        return torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], dim=1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (self._features(x) @ self.weight).float()


def sipit(tokens: Sequence[int], observed: torch.Tensor, ranked: torch.Tensor, known: set[int],
          edge: SpanModel, layers: Sequence[SpanModel], ops: BatchOps, tolerance: float) -> list[int]:
    """The tokens recovered for one sequence from its hidden states `observed` [T, dim] after `layers`.

    Position by position, the candidates `ranked[t]` (best first) are tried in growing batches after the
    prefix recovered so far; the first whose state is within `tolerance` (relative L2) of the observed one
    is taken, else the closest of them all. Positions in `known` (a public chat template) take `tokens[t]`.
    """
    T, budget = observed.shape[0], ranked.shape[1]
    caches = [layer.new_cache(T + budget) for layer in layers]

    def run(ids: Sequence[int], position: int) -> torch.Tensor:
        hidden = edge.embed(ids)
        for layer, cache in zip(layers, caches, strict=True):
            hidden = layer.forward_span(hidden, cache, position)
        return hidden

    recovered: list[int] = []
    for t in range(T):
        best, best_distance = int(ranked[t, 0]), float("inf")
        if t in known:
            best = tokens[t]
        else:
            target, tried, batch = observed[t], 0, 4
            while tried < budget and best_distance > tolerance:
                ids = ranked[t, tried:tried + batch].tolist()
                with ops.alternatives():  # each candidate alone after the prefix, all in one batch
                    distance = (run(ids, t) - target).norm(dim=-1) / target.norm().clamp_min(1e-12)
                i = int(distance.argmin())
                if float(distance[i]) < best_distance:
                    best, best_distance = ids[i], float(distance[i])
                tried, batch = tried + len(ids), batch * 2
        recovered.append(best)
        run([best], t)  # the prefix the next position is searched after
    return recovered


def through(layers: Sequence[SpanModel], hidden: torch.Tensor) -> torch.Tensor:
    """One sequence's hidden states [T, dim] through `layers` (a node running layers it was not lent)."""
    for layer in layers:
        hidden = layer.forward_span(hidden, layer.new_cache(hidden.shape[0]), 0)
    return hidden


"""Placement: which node holds which span of layers. A pure function, profiles in, a Plan out.

No I/O and no torch, so the swarm simulator can run it on thousands of synthetic clusters.

Cost model, per decoded token at batch 1 (the spans run one after the other, so costs add up):
    predicted ms = gateway's prefix + suffix layers × its ms_per_layer
                 + Σ over stages (layers × the node's ms_per_layer + one hop into the node)
                 + one hop back into the gateway.
A hop is charged to the machine that receives it: its rtt_ms / 2 + hidden_bytes_per_token / its bandwidth
(for the gateway, rtt_ms is its own round trip to the pool). Charging the receiver makes the cost
independent of the route's order, so the route is simply listed fastest node first (ties by id).

Memory is the hard constraint: a node holding n layers needs n × (layer_bytes + KV for
sessions × context tokens) ≤ free_bytes × (1 - safety_margin). The gateway holds only the tokenizer-side
edges (embedding, head, final norm) and the privacy prefix and suffix; it never takes middle layers.

Replicas (`with_replicas`, `replicate`): after the route is chosen, more copies of its spans go where memory
is left, spares first, so that when a node dies the gateway can fail over to a copy instead of streaming the
span's weights anew. The same function picks where a span goes when its last holder is gone, and what a
node that (re)joins should hold. Copies are budgeted like route layers (weights + KV for every session).
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

GB = 1e9


@dataclass(frozen=True)
class ModelProfile:
    name: str
    n_layers: int
    layer_bytes: int  # weights of one transformer layer, as held in memory (quantized)
    kv_bytes_per_token: int  # K + V of one layer for one token
    hidden_bytes_per_token: int  # the hidden state one stage sends to the next, per token
    edge_bytes: int  # embedding + LM head + final norm: held by the gateway only

    @classmethod
    def from_sizes(cls, name: str, n_layers: int, layer_bytes: int, edge_bytes: int, dim: int, n_kv_heads: int,
                   head_dim: int, kv_dtype_bytes: int = 2, hidden_dtype_bytes: int = 4) -> "ModelProfile":
        """From a model's shape: the KV cache stores fp16 K and V, hidden states travel as fp32 (for now)."""
        return cls(name, n_layers, layer_bytes, 2 * n_kv_heads * head_dim * kv_dtype_bytes,
                   dim * hidden_dtype_bytes, edge_bytes)


@dataclass(frozen=True)
class NodeProfile:
    id: str
    free_bytes: int  # memory the node may lend
    ms_per_layer: float  # measured decode time of one layer at batch 1
    rtt_ms: float  # round trip to the gateway; half of it is charged per hop into this node
    bandwidth_bytes_per_s: float
    backend: str = ""  # what computes there, as `plan` shows it: "mlx (Apple M2 Max GPU)", "cpu (...)"


@dataclass(frozen=True)
class PlanConfig:
    sessions: int = 4  # concurrent sessions whose KV cache every node must have room for
    context: int = 4096  # tokens per session
    privacy_prefix: int = 1  # first layers kept on the gateway
    privacy_suffix: int = 1  # last layers kept on the gateway
    safety_margin: float = 0.1  # fraction of each machine's free memory left unused


@dataclass(frozen=True)
class Stage:
    node_id: str
    start: int
    stop: int  # the node runs layers [start, stop)
    compute_ms: float = 0.0  # layers × ms_per_layer
    hop_ms: float = 0.0  # the hop into this node

    @property
    def layers(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]  # the route in order, between the gateway's prefix and suffix
    prefix: range  # layers the gateway runs before the route
    suffix: range  # layers the gateway runs after it
    predicted_ms_per_token: float
    gateway_ms: float  # the gateway's prefix + suffix compute
    return_hop_ms: float  # the last node's push back into the gateway (0 with no stages)
    excluded: tuple[tuple[str, str], ...]  # (node_id, why it got no layers), sorted by id
    replicas: tuple[Stage, ...] = ()  # more holders of the route's spans, to fail over to (see `replicate`)
    short: tuple[tuple[int, int, int], ...] = ()  # (start, stop, copies missing): spans no node had room for

    @property
    def tokens_per_s(self) -> float:
        return 1000 / self.predicted_ms_per_token if self.predicted_ms_per_token > 0 else math.inf


class ModelDoesNotFit(ValueError):
    pass


def layer_memory(model: ModelProfile, config: PlanConfig) -> int:
    """Bytes one layer takes on a node: its weights plus its KV cache for every budgeted session."""
    return model.layer_bytes + config.sessions * config.context * model.kv_bytes_per_token


def usable_bytes(node: NodeProfile, config: PlanConfig) -> float:
    return node.free_bytes * (1 - config.safety_margin)


def hop_ms(machine: NodeProfile, model: ModelProfile) -> float:
    """One hidden state pushed into `machine`: half its round trip plus the bytes over its link."""
    return machine.rtt_ms / 2 + 1000 * model.hidden_bytes_per_token / machine.bandwidth_bytes_per_s


@dataclass(frozen=True)
class _Candidate:
    node: NodeProfile
    cap: int  # layers that fit
    hop: float


def plan(model: ModelProfile, gateway: NodeProfile, nodes: list[NodeProfile] | tuple[NodeProfile, ...],
         config: PlanConfig | None = None) -> Plan:
    """The fastest placement of layers [prefix, L - suffix) on `nodes` that fits their memory.

    Raises ModelDoesNotFit when the gateway cannot hold its part or the nodes together lack room.
    """
    config = config or PlanConfig()
    n_private = config.privacy_prefix + config.privacy_suffix
    if min(config.privacy_prefix, config.privacy_suffix) < 0 or n_private > model.n_layers:
        raise ValueError(f"privacy prefix {config.privacy_prefix} + suffix {config.privacy_suffix} "
                         f"must fit in the model's {model.n_layers} layers")
    ids = [n.id for n in nodes]
    if len(set(ids)) != len(ids) or gateway.id in ids:
        raise ValueError(f"node ids must be unique and differ from the gateway's: {sorted(ids)}")

    per_layer = layer_memory(model, config)
    gateway_need = n_private * per_layer + model.edge_bytes
    if gateway_need > usable_bytes(gateway, config):
        raise ModelDoesNotFit(f"gateway {gateway.id} cannot hold model {model.name}'s edges and {n_private} private "
                              f"layers: needs {gateway_need / GB:.1f} GB, has {usable_bytes(gateway, config) / GB:.1f} "
                              f"GB usable")

    prefix = range(0, config.privacy_prefix)
    suffix = range(model.n_layers - config.privacy_suffix, model.n_layers)
    middle = suffix.start - prefix.stop
    gateway_ms = n_private * gateway.ms_per_layer

    candidates, excluded = [], {}
    for node in sorted(nodes, key=lambda n: (n.ms_per_layer, n.id)):
        cap = min(int(usable_bytes(node, config) // per_layer), middle)
        if middle == 0:
            excluded[node.id] = f"no layers to place: the gateway holds all {model.n_layers}"
        elif cap == 0:
            excluded[node.id] = (f"too little memory for one layer: needs {per_layer / GB:.2f} GB, "
                                 f"has {usable_bytes(node, config) / GB:.2f} GB usable")
        else:
            candidates.append(_Candidate(node, cap, hop_ms(node, model)))

    if middle == 0:
        return Plan((), prefix, suffix, gateway_ms, gateway_ms, 0.0, tuple(sorted(excluded.items())))

    best = _fill(candidates, middle)
    if best is None:
        held = sum(c.cap for c in candidates)
        raise ModelDoesNotFit(
            f"model {model.name} needs {(middle - held) * per_layer / GB:.1f} GB more memory than the pool has "
            f"(needs {middle * per_layer / GB:.1f} GB for {middle} layers + KV for {config.sessions} × "
            f"{config.context} tokens, pool offers {held * per_layer / GB:.1f} GB in whole layers after the "
            f"{config.safety_margin:.0%} safety margin)")
    cost, counts = best

    stages, start = [], prefix.stop
    for i, n in counts:
        c = candidates[i]
        stages.append(Stage(c.node.id, start, start + n, n * c.node.ms_per_layer, c.hop))
        start += n
    return_hop = hop_ms(gateway, model)

    # Why each unused node got nothing: how much more the best plan that gives it layers would cost.
    used = {i for i, _ in counts}
    for j, (c, forced) in enumerate(zip(candidates, _forced_costs(candidates, middle), strict=True)):
        if j not in used:
            excluded[c.node.id] = f"slower than leaving it out: +{forced - cost:.2f} ms/token"

    return Plan(tuple(stages), prefix, suffix, gateway_ms + cost + return_hop, gateway_ms, return_hop,
                tuple(sorted(excluded.items())))


def _fill(candidates: list[_Candidate], target: int) -> tuple[float, list] | None:
    """Cheapest (cost, [(candidate index, layers)]) placing exactly `target` layers; candidates fastest first.

    With the order fixed by speed, some optimal plan fills every used node to capacity except the slowest
    used one, which takes the remainder (moving a layer to a faster used node never costs more). So a
    plan is a set of full nodes plus one "finisher" after them: a 0/1 knapsack over layer counts, O(n × L).
    """
    full = {0: (0.0, None)}  # layers placed on full nodes so far -> (cost, linked list of choices)
    best = None
    for i, c in enumerate(candidates):
        for placed, (cost, chain) in full.items():
            rest = target - placed
            if 1 <= rest <= c.cap:
                total = cost + c.hop + rest * c.node.ms_per_layer
                if best is None or total < best[0]:
                    best = (total, (chain, (i, rest)))
        grown = dict(full)
        for placed, (cost, chain) in full.items():
            new, total = placed + c.cap, cost + c.hop + c.cap * c.node.ms_per_layer
            if new < target and (new not in grown or total < grown[new][0]):
                grown[new] = (total, (chain, (i, c.cap)))
        full = grown
    if best is None:
        return None
    counts, chain = [], best[1]
    while chain is not None:
        chain, choice = chain
        counts.append(choice)
    return best[0], counts[::-1]


def _forced_costs(candidates: list[_Candidate], target: int) -> list[float]:
    """For each candidate j, the cheapest cost of a plan that gives it at least one layer; all at once.

    Such a plan has j full or the finisher (see _fill), or j holding exactly one layer beside a plan of the rest.
    Both combine `before[j]` (the cheapest full sets among the candidates before j, by layers) with `after[j + 1]`
    (the cheapest full sets and finisher among those after j, by layers): O(n × target) for all n, where planning
    each one anew was O(n² × target) (16 s for a pool of 1000).
    """
    inf, n = math.inf, len(candidates)
    full = [c.hop + c.cap * c.node.ms_per_layer for c in candidates]

    def finish(i: int, layers: int) -> float:
        c = candidates[i]
        return c.hop + layers * c.node.ms_per_layer if 1 <= layers <= c.cap else inf

    before = [[0.0] + [inf] * (target - 1)]  # before[i][s]: full sets among the first i holding s < target layers
    for i, c in enumerate(candidates):
        row, prev = list(before[-1]), before[-1]
        for s in range(target - c.cap):
            row[s + c.cap] = min(row[s + c.cap], prev[s] + full[i])
        before.append(row)
    after = [[inf] * (target + 1) for _ in range(n + 1)]  # after[k][t]: exactly t layers, full nodes >= k, a finisher
    for k in range(n - 1, -1, -1):
        nxt, cap = after[k + 1], candidates[k].cap
        after[k] = [min(nxt[t], full[k] + nxt[t - cap] if t - cap >= 1 else inf, finish(k, t))
                    for t in range(target + 1)]

    costs, rest_before = [], inf  # rest_before: the cheapest plan of target - 1 layers finished before j
    for j, c in enumerate(candidates):
        fulls, later = before[j], after[j + 1]
        as_finisher = min(fulls[s] + finish(j, target - s) for s in range(target))
        as_full = min((fulls[s] + full[j] + later[target - s - c.cap] for s in range(target - c.cap)), default=inf)
        one = c.hop + c.node.ms_per_layer
        if target == 1:
            beside = one
        else:
            rest_after = min(fulls[s] + later[target - 1 - s] for s in range(target - 1))
            beside = one + min(rest_before, rest_after)
            rest_before = min(rest_before, min(fulls[s] + finish(j, target - 1 - s) for s in range(target - 1)))
        costs.append(min(as_finisher, as_full, beside))
    return costs


Span = tuple[int, int]  # layers [start, stop)


def replicate(model: ModelProfile, nodes: list[NodeProfile] | tuple[NodeProfile, ...], spans: list[Span],
              held: dict[str, list[Span]], copies: int,
              config: PlanConfig | None = None) -> tuple[tuple[Stage, ...], tuple[tuple[int, int, int], ...]]:
    """Where to load more copies of `spans` so that each is held by `copies` different nodes.

    `held`: the spans each node holds already (they count as copies and take its memory). A copy goes to
    a node that lacks the span and has room for it, preferring the node holding the fewest layers (spares
    first, so copies spread), then the fastest, then the next after a holder of the span in id order (so
    equal nodes each end up holding their successor's span, as in a ring). Every span gets its first copy
    before any gets its second, and so on; within a round, the longest spans are placed first.
    Returns (the new copies as stages, in the order chosen; (start, stop, copies missing) for each span
    no node had room for, in `spans` order).
    """
    config = config or PlanConfig()
    per_layer = layer_memory(model, config)
    holding = {n.id: set(held.get(n.id, ())) for n in nodes}  # nodes not in `nodes` (gone) hold nothing
    layers = {node_id: sum(b - a for a, b in held_) for node_id, held_ in holding.items()}
    count = {span: sum(span in held_ for held_ in holding.values()) for span in spans}
    rank = {node_id: i for i, node_id in enumerate(sorted(holding))}

    def after_holder(node_id: str, holders: list[int]) -> int:
        """How far `node_id` comes after the nearest of `holders` (ranks), cycling through the ids."""
        return min((rank[node_id] - h) % len(rank) for h in holders)

    added = []
    for target in range(1, copies + 1):
        for span in sorted(spans, key=lambda s: s[0] - s[1]):  # longest first: the shorter ones even out the load
            n_layers = span[1] - span[0]
            fits = [n for n in nodes if count[span] < target and span not in holding[n.id]
                    and (layers[n.id] + n_layers) * per_layer <= usable_bytes(n, config)]
            if fits:
                # the span's holders once per choice, not once per candidate: a pool of thousands stays linear
                holders = [rank[h] for h, held_ in holding.items() if span in held_] or [-1]
                node = min(fits, key=lambda n: (layers[n.id], n.ms_per_layer, after_holder(n.id, holders), n.id))
                holding[node.id].add(span)
                layers[node.id] += n_layers
                count[span] += 1
                added.append(Stage(node.id, span[0], span[1], n_layers * node.ms_per_layer, hop_ms(node, model)))
    short = tuple((a, b, copies - count[(a, b)]) for a, b in spans if count[(a, b)] < copies)
    return tuple(added), short


def with_replicas(plan_: Plan, model: ModelProfile, nodes: list[NodeProfile] | tuple[NodeProfile, ...],
                  replicas: int, config: PlanConfig | None = None) -> Plan:
    """`plan_` with `replicas` more copies of each of its spans, where memory allows (see `replicate`)."""
    if replicas < 0:
        raise ValueError(f"replicas must be >= 0, not {replicas}")
    spans = [(s.start, s.stop) for s in plan_.stages]
    held: dict[str, list[Span]] = {}
    for s in plan_.stages:
        held.setdefault(s.node_id, []).append((s.start, s.stop))
    added, short = replicate(model, nodes, spans, held, 1 + replicas, config)
    return Plan(plan_.stages, plan_.prefix, plan_.suffix, plan_.predicted_ms_per_token, plan_.gateway_ms,
                plan_.return_hop_ms, plan_.excluded, added, short)


def explain(plan: Plan, model: ModelProfile, gateway: NodeProfile,
            nodes: list[NodeProfile] | tuple[NodeProfile, ...], config: PlanConfig | None = None) -> str:
    """A plain-text table of the plan: who holds what, the memory it takes, and where the time goes."""
    config = config or PlanConfig()
    by_id = {n.id: n for n in nodes}
    per_layer = layer_memory(model, config)
    rows = [("node", "backend", "layers", "span", "memory used/usable", "ms/layer", "compute ms", "hop ms")]

    def row(machine: NodeProfile, layers: int, span: str, used: float, compute: float, hop: str) -> None:
        rows.append((machine.id, machine.backend or "-", str(layers), span,
                     f"{used / GB:.1f}/{usable_bytes(machine, config) / GB:.1f} GB", f"{machine.ms_per_layer:.2f}",
                     f"{compute:.2f}", hop))

    n_private = len(plan.prefix) + len(plan.suffix)
    private = ", ".join(f"{r.start}-{r.stop}" for r in (plan.prefix, plan.suffix) if len(r))
    row(gateway, n_private, private or "-", n_private * per_layer + model.edge_bytes, plan.gateway_ms,
        f"{plan.return_hop_ms:.2f} (return)" if plan.stages else "-")
    for s in plan.stages:
        row(by_id[s.node_id], s.layers, f"{s.start}-{s.stop}", s.layers * per_layer, s.compute_ms, f"{s.hop_ms:.2f}")
    for s in plan.replicas:
        row(by_id[s.node_id], s.layers, f"{s.start}-{s.stop} replica", s.layers * per_layer, s.compute_ms,
            f"{s.hop_ms:.2f}")

    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    text_columns = (0, 1, 3)  # node, backend and span; the numbers are right-aligned
    lines = ["  ".join(c.ljust(widths[k]) if k in text_columns else c.rjust(widths[k]) for k, c in enumerate(r))
             for r in rows]
    lines += [f"{node_id}: no layers, {reason}" for node_id, reason in plan.excluded]
    lines += [f"layers {a}-{b}: {missing} replica(s) short, no node has room" for a, b, missing in plan.short]
    lines.append(f"model {model.name}: {plan.predicted_ms_per_token:.1f} ms/token predicted "
                 f"({plan.tokens_per_s:.1f} tok/s), spans [start-stop) run in the order listed")
    return "\n".join(lines)


# --- the planner's inputs, from what nodes say about themselves ----------------------------------------------------
# The gateway as the planner sees it: it holds only the edges and the privacy layers, never middle ones.
GATEWAY_PROFILE = NodeProfile("gateway", 2**62, 0.0, 0.0, 1e12)


def claimed_ms_per_layer(matmul_bytes_per_ms: float, layer_bytes: int) -> float:
    """What a layer costs a node by the weight bandwidth it reports (0: it reports none)."""
    return layer_bytes / matmul_bytes_per_ms if matmul_bytes_per_ms > 0 else 0.0


def node_profile(client: Any, layer_bytes: int, even: bool = False) -> NodeProfile:
    """A node as the planner sees it, from `client.info` (its `Info`: node_id, memory_free, matmul_bytes_per_ms) and
    `client.rtt_ms`: a membership NodeClient, or a simulated node. `even`: all nodes count as equally fast (a local
    swarm, whose nodes share one CPU)."""
    info = client.info
    ms_per_layer = (not even and claimed_ms_per_layer(info.matmul_bytes_per_ms, layer_bytes)) or 1.0
    backend = f"{info.backend} ({info.device})" if info.backend and info.device else info.backend
    return NodeProfile(info.node_id, info.memory_free, ms_per_layer, client.rtt_ms,
                       bandwidth_bytes_per_s=125e6, backend=backend)  # assume gigabit until measured


def even_plan(plan_: Plan, node_ids: list[str]) -> Plan:
    """`plan_`'s prefix and suffix, with the layers between split as evenly as possible over all nodes."""
    start, stop, n = plan_.prefix.stop, plan_.suffix.start, len(node_ids)
    bounds = [start + (stop - start) * i // n for i in range(n + 1)]
    stages = tuple(Stage(node_id, a, b) for node_id, a, b in zip(node_ids, bounds, bounds[1:], strict=False) if b > a)
    return dataclasses.replace(plan_, stages=stages, excluded=())


def first_plan(model: ModelProfile, clients: list, config: PlanConfig, even: bool, replicas: int) -> Plan:
    """The route over `clients` (split evenly if `even`: a local swarm, whose nodes share one CPU, gives the speed
    model nothing to choose), plus `replicas` more copies of each span where memory allows."""
    plan_ = plan(model, GATEWAY_PROFILE, [node_profile(c, model.layer_bytes) for c in clients], config)
    if even:
        plan_ = even_plan(plan_, [c.info.node_id for c in clients])
    profiles = [node_profile(c, model.layer_bytes, even=even) for c in clients]
    return with_replicas(plan_, model, profiles, replicas, config)

"""The placement planner on synthetic Apple-silicon households: spans, memory, speed, and its explanations."""

import itertools
import random
import time

import pytest

from duskpool.cluster.planner import (
    GB,
    ModelDoesNotFit,
    ModelProfile,
    NodeProfile,
    Plan,
    PlanConfig,
    explain,
    hop_ms,
    layer_memory,
    plan,
    replicate,
    usable_bytes,
    with_replicas,
)

# Llama-70B at ~4.5 bits: 80 layers of 0.5 GB (≈40 GB), 8 KV heads × 128 dims in fp16 -> 4 KB per token per layer.
LLAMA_70B = ModelProfile.from_sizes("llama-70b-q4", n_layers=80, layer_bytes=500_000_000, edge_bytes=1_100_000_000,
                                    dim=8192, n_kv_heads=8, head_dim=128)
CONFIG = PlanConfig()  # 4 sessions × 4096 tokens: 64 MiB of KV per layer on top of its 0.5 GB
PER_LAYER = layer_memory(LLAMA_70B, CONFIG)
MIDDLE = 78  # layers the route carries: one each stays on the gateway at either end
WIFI, ETHERNET = (4.0, 50e6), (0.5, 110e6)  # (rtt ms, bytes/s)


def mac(node_id: str, free_gb: float, ms_per_layer: float, link: tuple[float, float] = ETHERNET) -> NodeProfile:
    return NodeProfile(node_id, int(free_gb * GB), ms_per_layer, *link)


# Decode of a 0.5 GB layer is bound by memory bandwidth (68, 100, 200, 400 GB/s) at ~70% efficiency;
# free memory is what macOS lets the GPU wire, about 65-75% of RAM.
M1_8 = mac("m1-8gb", 5, 10.0, WIFI)
M2_16 = mac("m2-16gb", 11, 7.0, WIFI)
M2PRO_32 = mac("m2pro-32gb", 24, 3.5)
M3MAX_64 = mac("m3max-64gb", 48, 1.8)
M3MAX_128 = mac("m3max-128gb", 96, 1.8)
GATEWAY = mac("gateway", 24, 3.5, (0.5, 110e6))


def assert_valid(p: Plan, model: ModelProfile, nodes: list[NodeProfile], config: PlanConfig = CONFIG) -> None:
    """Spans are contiguous, cover the middle exactly once in route order, and fit each node's memory."""
    assert p.prefix == range(0, config.privacy_prefix)
    assert p.suffix == range(model.n_layers - config.privacy_suffix, model.n_layers)
    position = p.prefix.stop
    for stage in p.stages:
        assert stage.start == position and stage.stop > stage.start, f"gap or overlap at {stage}"
        position = stage.stop
    assert position == p.suffix.start, f"the route ends at layer {position}, the suffix starts at {p.suffix.start}"
    by_id = {n.id: n for n in nodes}
    assert len({s.node_id for s in p.stages}) == len(p.stages), "a node appears twice in the route"
    for stage in p.stages:
        used = stage.layers * layer_memory(model, config)
        assert used <= usable_bytes(by_id[stage.node_id], config), f"{stage.node_id} over its memory"
    assert {s.node_id for s in p.stages} | {i for i, _ in p.excluded} == set(by_id), "a node is missing"


def counts(p: Plan) -> dict[str, int]:
    return {s.node_id: s.layers for s in p.stages}


def brute_force_ms(model: ModelProfile, gateway: NodeProfile, nodes: list[NodeProfile], config: PlanConfig,
                   must: str | None = None) -> float:
    """The best predicted ms/token over every assignment of layer counts (tiny models only)."""
    middle = model.n_layers - config.privacy_prefix - config.privacy_suffix
    caps = [min(int(usable_bytes(n, config) // layer_memory(model, config)), middle) for n in nodes]
    best = float("inf")
    for xs in itertools.product(*(range(c + 1) for c in caps)):
        if sum(xs) != middle or (must and xs[[n.id for n in nodes].index(must)] == 0):
            continue
        used = [(n, x) for n, x in zip(nodes, xs, strict=True) if x]
        cost = sum(hop_ms(n, model) + x * n.ms_per_layer for n, x in used) + (hop_ms(gateway, model) if used else 0)
        best = min(best, cost)
    return best + (config.privacy_prefix + config.privacy_suffix) * gateway.ms_per_layer


def random_cluster(rng: random.Random, n_nodes: int) -> list[NodeProfile]:
    return [NodeProfile(f"n{i}", rng.randrange(1, 12) * GB, rng.choice([0.5, 1, 2, 4, 8, 20]) * rng.uniform(0.9, 1.1),
                        rng.uniform(0.2, 12), rng.choice([5e6, 50e6, 1e9])) for i in range(n_nodes)]


def test_70b_over_four_machines_of_13gb_gets_about_20_layers_each():
    nodes = [mac(f"mac-{i}", 13, 1.8) for i in range(4)]  # 11.7 GB usable = 20 layers of 0.57 GB each
    p = plan(LLAMA_70B, GATEWAY, nodes, CONFIG)
    assert_valid(p, LLAMA_70B, nodes)
    assert counts(p) == {"mac-0": 20, "mac-1": 20, "mac-2": 20, "mac-3": 18}
    hops = 4 * hop_ms(nodes[0], LLAMA_70B) + hop_ms(GATEWAY, LLAMA_70B)
    assert p.predicted_ms_per_token == pytest.approx(2 * 3.5 + 78 * 1.8 + hops)
    assert p.excluded == ()


def test_bigger_machines_mean_fewer_stages_since_every_hop_costs():
    nodes = [mac(f"mac-{i}", 24, 1.8) for i in range(4)]  # 38 layers each: three stages are enough
    p = plan(LLAMA_70B, GATEWAY, nodes, CONFIG)
    assert_valid(p, LLAMA_70B, nodes)
    assert counts(p) == {"mac-0": 38, "mac-1": 38, "mac-2": 2}
    assert [i for i, _ in p.excluded] == ["mac-3"]


def test_a_10x_slower_node_gets_nothing_when_the_rest_hold_the_model():
    slow = mac("slow", 40, 18.0)
    nodes = [mac(f"mac-{i}", 13, 1.8) for i in range(4)] + [slow]
    p = plan(LLAMA_70B, GATEWAY, nodes, CONFIG)
    assert_valid(p, LLAMA_70B, nodes)
    assert "slow" not in counts(p)
    # forced in, it would take one layer off mac-3 and add its hop
    extra = 18.0 - 1.8 + hop_ms(slow, LLAMA_70B)
    assert dict(p.excluded) == {"slow": f"slower than leaving it out: +{extra:.2f} ms/token"}
    text = explain(p, LLAMA_70B, GATEWAY, nodes, CONFIG)
    assert f"slow: no layers, slower than leaving it out: +{extra:.2f} ms/token" in text
    assert f"{p.predicted_ms_per_token:.1f} ms/token" in text and f"{p.tokens_per_s:.1f} tok/s" in text


def test_the_same_slow_node_gets_layers_when_memory_requires_it():
    slow = mac("slow", 40, 18.0)
    nodes = [mac(f"mac-{i}", 13, 1.8) for i in range(3)] + [slow]  # 60 fast layers for 78
    p = plan(LLAMA_70B, GATEWAY, nodes, CONFIG)
    assert_valid(p, LLAMA_70B, nodes)
    assert counts(p) == {"mac-0": 20, "mac-1": 20, "mac-2": 20, "slow": 18}
    assert [s.node_id for s in p.stages][-1] == "slow", "the route runs fastest first"


def test_apple_household_puts_the_whole_model_on_the_machine_that_holds_it():
    nodes = [M1_8, M2_16, M2PRO_32, M3MAX_64, M3MAX_128]
    p = plan(LLAMA_70B, GATEWAY, nodes, CONFIG)
    assert_valid(p, LLAMA_70B, nodes)
    assert counts(p) == {"m3max-128gb": 78}  # any other stage adds a hop and saves no compute
    assert [i for i, _ in p.excluded] == ["m1-8gb", "m2-16gb", "m2pro-32gb", "m3max-64gb"]
    text = explain(p, LLAMA_70B, GATEWAY, nodes, CONFIG)
    for node in nodes:
        assert node.id in text
    assert "1-79" in text and "0-1, 79-80" in text


def test_apple_household_without_the_big_one_spreads_fastest_first():
    nodes = [M1_8, M2_16, M2PRO_32, M3MAX_64]
    p = plan(LLAMA_70B, GATEWAY, nodes, CONFIG)
    assert_valid(p, LLAMA_70B, nodes)
    # the M3 Max fits 76 layers; the last two go where a layer plus a hop is cheapest, the M2 Pro
    assert counts(p) == {"m3max-64gb": 76, "m2pro-32gb": 2}


def test_a_model_too_big_for_the_pool_says_how_many_gb_are_missing():
    nodes = [mac(f"m1-{i}", 5, 10.0) for i in range(4)]  # 4.5 GB usable: 7 layers each, 28 of 78
    with pytest.raises(ModelDoesNotFit) as error:
        plan(LLAMA_70B, GATEWAY, nodes, CONFIG)
    message = str(error.value)
    assert f"needs {50 * PER_LAYER / GB:.1f} GB more memory" in message, message
    assert f"needs {78 * PER_LAYER / GB:.1f} GB for 78 layers" in message
    assert f"pool offers {28 * PER_LAYER / GB:.1f} GB" in message
    assert "28.4 GB more" in message  # 50 layers × (0.5 GB + 64 MiB of KV)


def test_a_gateway_without_room_for_its_private_layers_is_refused():
    with pytest.raises(ModelDoesNotFit, match="gateway tiny cannot hold"):
        plan(LLAMA_70B, mac("tiny", 2, 3.5), [M3MAX_128], CONFIG)


def test_a_node_too_small_for_one_layer_is_excluded_with_its_memory():
    p = plan(LLAMA_70B, GATEWAY, [M3MAX_128, mac("pi", 0.5, 30.0)], CONFIG)
    assert dict(p.excluded)["pi"].startswith("too little memory for one layer: needs 0.57 GB")


def test_a_model_the_gateway_holds_entirely_has_no_route():
    tiny = ModelProfile("tiny", 2, 1_000_000, 1024, 256, 1_000_000)
    p = plan(tiny, GATEWAY, [M1_8], CONFIG)
    assert p.stages == () and p.return_hop_ms == 0 and p.predicted_ms_per_token == 2 * GATEWAY.ms_per_layer
    assert dict(p.excluded)["m1-8gb"].startswith("no layers to place")


def test_the_plan_is_optimal_against_brute_force_and_explains_exclusions_exactly():
    rng = random.Random(7)
    model = ModelProfile("small", 12, 1 * 10**9, 1024, 400_000, 10**8)
    checked, explained = 0, 0
    for _ in range(80):
        nodes = random_cluster(rng, rng.randrange(1, 5))
        try:
            p = plan(model, GATEWAY, nodes, CONFIG)
        except ModelDoesNotFit:
            assert brute_force_ms(model, GATEWAY, nodes, CONFIG) == float("inf")
            continue
        assert_valid(p, model, nodes)
        assert p.predicted_ms_per_token == pytest.approx(brute_force_ms(model, GATEWAY, nodes, CONFIG))
        for node_id, reason in p.excluded:
            if reason.startswith("slower"):
                forced = brute_force_ms(model, GATEWAY, nodes, CONFIG, must=node_id)
                assert reason == f"slower than leaving it out: +{forced - p.predicted_ms_per_token:.2f} ms/token"
                explained += 1
        checked += 1
    assert checked > 30 and explained > 10, (checked, explained)


def test_the_plan_is_never_worse_than_the_plan_without_any_single_node():
    rng = random.Random(2024)
    for _ in range(30):
        nodes = random_cluster(rng, rng.randrange(2, 9))
        try:
            p = plan(LLAMA_70B, GATEWAY, nodes, CONFIG)
        except ModelDoesNotFit:
            continue
        assert_valid(p, LLAMA_70B, nodes)
        for left_out in nodes:
            try:
                without = plan(LLAMA_70B, GATEWAY, [n for n in nodes if n is not left_out], CONFIG)
            except ModelDoesNotFit:
                continue
            assert p.predicted_ms_per_token <= without.predicted_ms_per_token + 1e-9, left_out.id


def test_the_same_inputs_give_the_same_plan_in_any_order():
    rng = random.Random(5)
    nodes = [mac(f"mac-{i}", 13, 1.8) for i in range(6)] + random_cluster(rng, 6)
    first = plan(LLAMA_70B, GATEWAY, nodes, CONFIG)
    assert plan(LLAMA_70B, GATEWAY, nodes, CONFIG) == first
    for _ in range(5):
        rng.shuffle(nodes)
        assert plan(LLAMA_70B, GATEWAY, nodes, CONFIG) == first
        assert explain(first, LLAMA_70B, GATEWAY, nodes, CONFIG) == explain(first, LLAMA_70B, GATEWAY, nodes)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="unique"):
        plan(LLAMA_70B, GATEWAY, [M1_8, M1_8], CONFIG)
    with pytest.raises(ValueError, match="must fit"):
        plan(LLAMA_70B, GATEWAY, [M1_8], PlanConfig(privacy_prefix=50, privacy_suffix=31))


# --- replicas ---------------------------------------------------------------------------------------

def holders(p: Plan) -> dict[tuple[int, int], list[str]]:
    """Each span of the route -> the nodes holding it, its route node first."""
    held = {(s.start, s.stop): [s.node_id] for s in p.stages}
    for r in p.replicas:
        held[(r.start, r.stop)].append(r.node_id)
    return held


def assert_replicas_valid(p: Plan, model: ModelProfile, nodes: list[NodeProfile], replicas: int,
                          config: PlanConfig = CONFIG) -> None:
    """Copies on distinct nodes, within every node's memory, and a span is short only if no node had room."""
    by_id = {n.id: n for n in nodes}
    per_layer = layer_memory(model, config)
    used = dict.fromkeys(by_id, 0)
    for s in p.stages + p.replicas:
        used[s.node_id] += s.layers
    for node_id, layers in used.items():
        assert layers * per_layer <= usable_bytes(by_id[node_id], config), f"{node_id} over its memory"
    short = {(a, b): missing for a, b, missing in p.short}
    for span, ids in holders(p).items():
        assert len(set(ids)) == len(ids), f"a node holds {span} twice: {ids}"
        assert len(ids) == 1 + replicas - short.get(span, 0), (span, ids, short)
        if span in short:
            room = [i for i in by_id if i not in ids and (used[i] + span[1] - span[0]) * per_layer
                    <= usable_bytes(by_id[i], config)]
            assert room == [], f"{span} is short of copies, yet {room} had room for it"


def test_replicas_go_to_spare_machines_first_and_spread_over_them():
    spares = [mac("spare-a", 40, 18.0), mac("spare-b", 40, 18.0)]
    nodes = [mac(f"mac-{i}", 13, 1.8) for i in range(4)] + spares
    first = plan(LLAMA_70B, GATEWAY, nodes, CONFIG)
    p = with_replicas(first, LLAMA_70B, nodes, 1, CONFIG)
    assert p.stages == first.stages and p.predicted_ms_per_token == first.predicted_ms_per_token
    assert [(r.node_id, r.start, r.stop) for r in p.replicas] == [
        ("spare-a", 1, 21), ("spare-b", 21, 41), ("spare-a", 41, 61), ("spare-b", 61, 79)]
    assert p.short == ()
    assert_replicas_valid(p, LLAMA_70B, nodes, 1)
    assert "41-61 replica" in explain(p, LLAMA_70B, GATEWAY, nodes, CONFIG)


def test_no_replica_where_no_machine_has_room_and_the_plan_says_so():
    nodes = [mac(f"mac-{i}", 13, 1.8) for i in range(4)]  # full: 20 + 20 + 20 + 18 of 20 layers each
    p = with_replicas(plan(LLAMA_70B, GATEWAY, nodes, CONFIG), LLAMA_70B, nodes, 1, CONFIG)
    assert p.replicas == ()
    assert p.short == ((1, 21, 1), (21, 41, 1), (41, 61, 1), (61, 79, 1))
    assert "layers 61-79: 1 replica(s) short, no node has room" in explain(p, LLAMA_70B, GATEWAY, nodes, CONFIG)


def test_equal_nodes_each_hold_their_successors_span_as_in_a_ring():
    small = ModelProfile("small", 30, 3_000_000, 1024, 2304, 50_000_000)
    nodes = [mac(f"n{i}", 8, 1.0) for i in range(3)]
    spans = [(1, 10), (10, 19), (19, 28)]
    added, short = replicate(small, nodes, spans, {"n0": [(1, 10)], "n1": [(10, 19)], "n2": [(19, 28)]}, 2)
    assert [(s.node_id, s.start, s.stop) for s in added] == [("n1", 1, 10), ("n2", 10, 19), ("n0", 19, 28)]
    assert short == ()


def test_a_span_whose_holders_are_gone_goes_to_the_spare_with_room():
    small = ModelProfile("small", 30, 1 * 10**9, 1024, 2304, 50_000_000)  # 1 GB layers: 9 need ~10 GB
    survivors = [mac("full", 11, 1.0), mac("roomy", 24, 3.0), mac("tiny", 4, 0.5)]
    held = {"full": [(1, 10)], "gone": [(10, 19)]}  # "gone" is not among the nodes: it holds nothing now
    added, short = replicate(small, survivors, [(1, 10), (10, 19)], held, 1)
    assert [(s.node_id, s.start, s.stop) for s in added] == [("roomy", 10, 19)]
    assert short == ()
    added, short = replicate(small, [survivors[0], survivors[2]], [(1, 10), (10, 19)], held, 1)
    assert added == () and short == ((10, 19, 1),)


def test_replicas_are_valid_on_random_clusters_and_none_leaves_the_plan_as_it_was():
    rng = random.Random(11)
    model = ModelProfile("small", 12, 1 * 10**9, 1024, 400_000, 10**8)
    checked, replicated, short = 0, 0, 0
    for _ in range(80):
        nodes = random_cluster(rng, rng.randrange(1, 8))
        try:
            first = plan(model, GATEWAY, nodes, CONFIG)
        except ModelDoesNotFit:
            continue
        assert with_replicas(first, model, nodes, 0, CONFIG) == first
        for replicas in (1, 2, 3):
            p = with_replicas(first, model, nodes, replicas, CONFIG)
            assert_replicas_valid(p, model, nodes, replicas)
            shuffled = nodes[:]
            rng.shuffle(shuffled)
            assert with_replicas(first, model, shuffled, replicas, CONFIG) == p, "the order of nodes mattered"
            replicated, short = replicated + len(p.replicas), short + len(p.short)
        checked += 1
    assert checked > 30 and replicated > 50 and short > 10, (checked, replicated, short)


def test_replicas_must_not_be_negative():
    with pytest.raises(ValueError, match="replicas"):
        with_replicas(plan(LLAMA_70B, GATEWAY, [M3MAX_128], CONFIG), LLAMA_70B, [M3MAX_128], -1, CONFIG)


def test_replicas_of_unequal_spans_even_out_the_layers_each_node_holds():
    small = ModelProfile("small", 30, 3_000_000, 1024, 2304, 50_000_000)
    nodes = [mac(f"n{i}", 8, 1.0) for i in range(3)]
    held = {"n0": [(19, 29)], "n1": [(1, 10)], "n2": [(10, 19)]}  # 10, 9 and 9 layers
    added, _ = replicate(small, nodes, [(1, 10), (10, 19), (19, 29)], held, 2)
    layers = {n.id: sum(b - a for a, b in held[n.id]) for n in nodes}
    for s in added:
        layers[s.node_id] += s.layers
    assert sorted(layers.values()) == [18, 19, 19], layers


def test_exclusions_on_larger_pools_are_still_exact_against_brute_force():
    rng = random.Random(11)
    model = ModelProfile("tiny", 7, 1 * 10**9, 1024, 400_000, 10**8)  # 5 layers to place: brute force stays cheap
    explained = 0
    for _ in range(12):
        nodes = random_cluster(rng, 6)
        try:
            p = plan(model, GATEWAY, nodes, CONFIG)
        except ModelDoesNotFit:
            continue
        for node_id, reason in p.excluded:
            if reason.startswith("slower"):
                forced = brute_force_ms(model, GATEWAY, nodes, CONFIG, must=node_id)
                assert reason == f"slower than leaving it out: +{forced - p.predicted_ms_per_token:.2f} ms/token"
                explained += 1
    assert explained > 10, explained


def test_a_pool_of_a_thousand_machines_is_planned_and_explained_in_well_under_a_second():
    rng = random.Random(5)
    nodes = [NodeProfile(f"n{i}", rng.choice([5, 11, 24, 48, 96, 140]) * GB, rng.choice([10, 7, 3.5, 1.8, 0.9]),
                         rng.uniform(0.3, 8), rng.choice([50e6, 110e6])) for i in range(1000)]
    started = time.perf_counter()
    p = plan(LLAMA_70B, GATEWAY, nodes, CONFIG)
    assert time.perf_counter() - started < 3  # it took 16 s when each exclusion was planned anew
    assert_valid(p, LLAMA_70B, nodes)
    assert len(p.excluded) == 1000 - len(p.stages)

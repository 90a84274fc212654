"""What a simulation found: served tokens/s, latencies, completed requests and why the others were lost, re-plans,
weight bytes moved, per-node utilisation; as one JSON object, a table, and a PNG over simulated time."""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from duskpool.simulate.fleet import HOUR


@dataclass(frozen=True)
class Report:
    nodes: int
    hours: float
    model_shape: str
    seed: int
    requests_arrived: int
    requests_completed: int
    completed_fraction: float
    requests_lost: dict[str, int]  # reason -> count
    requests_unfinished: int  # still queued or generating when the simulation ended
    tokens_generated: int
    tokens_per_s: float  # over the whole simulated time
    peak_tokens_per_s: float  # the busiest sampling interval
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    token_latency_p50_s: float | None
    token_latency_p99_s: float | None
    recoveries: int
    recovery_p50_s: float | None
    first_plan_stages: list[dict[str, Any]]  # node, machine, layers
    first_plan_ms_per_token: float  # the planner's prediction at batch 1 (gateway compute not counted)
    replans: int  # route rebuilds
    placements: int  # span copies loaded after the first plan
    weight_bytes_moved: int  # over the network after the first plan's load (a node's disk cache is read back instead)
    first_load_bytes: int  # the first plan's spans, streamed before serving starts
    deaths: int  # nodes the gateway stopped counting on (crashes, Wi-Fi drops, laptops carried off)
    drains: int  # nodes whose owner came back
    drain_timeouts: int
    nodes_lent_min: int
    nodes_lent_max: int
    nodes_ever_used: int
    utilisation_mean_of_used: float
    utilisation: dict[str, float]  # node -> busy fraction of the simulated time, nodes that computed anything
    invariant_checks: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self, wall_s: float | None = None) -> str:
        def s(x: float | None, unit: str = "s") -> str:
            return "-" if x is None else f"{x * 1000:.0f} ms" if unit == "s" and x < 1 else f"{x:.2f} {unit}"

        lost = ", ".join(f"{n} {why}" for why, n in sorted(self.requests_lost.items())) or "none"
        stages = "; ".join(f"{st['node']} ({st['machine']}) layers {st['layers']}" for st in self.first_plan_stages)
        busiest = sorted(self.utilisation.items(), key=lambda kv: -kv[1])[:5]
        lines = [
            f"{self.nodes} nodes, {self.hours:g} h, {self.model_shape}, seed {self.seed}"
            + (f" (simulated in {wall_s:.1f} s)" if wall_s is not None else ""),
            f"first plan: {stages} ({self.first_plan_ms_per_token:.1f} ms/token predicted)",
            f"requests: {self.requests_arrived} arrived, {self.requests_completed} completed "
            f"({self.completed_fraction:.1%}), {self.requests_unfinished} unfinished at the end; lost: {lost}",
            f"served: {self.tokens_generated} tokens, {self.tokens_per_s:.1f} tok/s on average, "
            f"{self.peak_tokens_per_s:.1f} tok/s in the busiest interval",
            f"time to first token: p50 {s(self.ttft_p50_s)}, p99 {s(self.ttft_p99_s)}; per token: "
            f"p50 {s(self.token_latency_p50_s)}, p99 {s(self.token_latency_p99_s)}",
            f"churn: {self.deaths} nodes gone, {self.drains} drains ({self.drain_timeouts} timed out), "
            f"{self.recoveries} sessions recovered (p50 {s(self.recovery_p50_s)}), {self.replans} re-plans, "
            f"{self.placements} spans loaded, {self.weight_bytes_moved / 1e9:.1f} GB of weights moved (after the first "
            f"plan's {self.first_load_bytes / 1e9:.1f} GB)",
            f"nodes lent: {self.nodes_lent_min}-{self.nodes_lent_max}; {self.nodes_ever_used} ever computed "
            f"(mean utilisation {self.utilisation_mean_of_used:.1%}); busiest: "
            + ", ".join(f"{n} {u:.1%}" for n, u in busiest),
        ]
        return "\n".join(lines)


def report(world, config) -> Report:
    """The report of a finished `world` (simulate.World); no wall time in it: the same seed gives the same report."""
    horizon = world.horizon
    samples = world.samples
    used = {n.id: n.busy_s / horizon for n in world.nodes.values() if n.busy_s > 0}
    stages = [{"node": s.node_id, "machine": world.nodes[s.node_id].machine.name, "layers": f"{s.start}-{s.stop}"}
              for s in world.plan.stages]
    peak = max((x.tokens / world.options.sample_s for x in samples), default=0.0)
    return Report(
        nodes=len(world.nodes), hours=config.hours, model_shape=config.shape, seed=config.seed,
        requests_arrived=world.arrived, requests_completed=world.completed,
        completed_fraction=world.completed / world.arrived if world.arrived else 1.0,
        requests_lost=dict(sorted(world.lost.items())), requests_unfinished=world.unfinished,
        tokens_generated=world.tokens, tokens_per_s=world.tokens / horizon, peak_tokens_per_s=peak,
        ttft_p50_s=world.ttft.quantile(0.5), ttft_p99_s=world.ttft.quantile(0.99),
        token_latency_p50_s=world.token_latency.quantile(0.5), token_latency_p99_s=world.token_latency.quantile(0.99),
        recoveries=world.recovery.n, recovery_p50_s=world.recovery.quantile(0.5),
        first_plan_stages=stages, first_plan_ms_per_token=world.plan.predicted_ms_per_token,
        replans=world.replans, placements=world.placements,
        weight_bytes_moved=world.weight_bytes - world.first_load_bytes, first_load_bytes=world.first_load_bytes,
        deaths=world.deaths, drains=world.drains, drain_timeouts=world.drain_timeouts,
        nodes_lent_min=min((x.lent for x in samples), default=0),
        nodes_lent_max=max((x.lent for x in samples), default=0),
        nodes_ever_used=len(used), utilisation_mean_of_used=sum(used.values()) / len(used) if used else 0.0,
        utilisation=dict(sorted(used.items())), invariant_checks=world.invariant_checks)


def plot(world, path: str | Path, title: str) -> Path:
    """Tokens/s, nodes lent, sessions and queue, re-plans and weights moved, over simulated time, as a PNG.
    Needs matplotlib (pip install 'duskpool[simulate]')."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib, which is not installed: "
                           "pip install 'duskpool[simulate]'") from None
    samples = world.samples
    hours = [x.t / HOUR for x in samples]
    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    axes[0].plot(hours, [x.tokens / world.options.sample_s for x in samples], lw=0.8)
    axes[0].set_ylabel("tokens/s served")
    axes[1].plot(hours, [x.lent for x in samples], label="nodes lent")
    axes[1].plot(hours, [x.awake for x in samples], label="nodes awake", alpha=0.6)
    axes[1].legend(loc="upper right")
    axes[1].set_ylabel("nodes")
    axes[2].plot(hours, [x.active for x in samples], label="generating")
    axes[2].plot(hours, [x.queued for x in samples], label="queued")
    axes[2].legend(loc="upper right")
    axes[2].set_ylabel("requests")
    axes[3].plot(hours, [x.replans for x in samples], label="re-plans (cumulative)")
    ax = axes[3].twinx()
    ax.plot(hours, [x.weight_bytes / 1e9 for x in samples], color="tab:red", label="weights moved (GB)")
    ax.set_ylabel("GB moved")
    axes[3].set_ylabel("re-plans")
    axes[3].set_xlabel("simulated time (h from midnight)")
    axes[0].set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

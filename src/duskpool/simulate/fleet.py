"""What the simulator runs on: real machines' published figures, model shapes, LAN and Wi-Fi links, and one office
day of each machine's owner (at the desk 9-18 with breaks, meetings, laptops that leave, nights, days off).

Speeds follow the planner's own model: a node reports `matmul_bytes_per_ms` (the bytes of packed weights it
streams through a matmul per millisecond), and the planner takes ms_per_layer = layer bytes / that. A simulated
node's figure is its published memory bandwidth times what its backend reaches of it in decode.
"""

import math
import random
from dataclasses import dataclass

from duskpool.cluster.planner import GB, ModelProfile
from duskpool.idle.policy import LendPolicy

HOUR = 3600.0

# The share of published memory bandwidth a backend streams weights at in decode (MLX's quantized matmul on Apple
# GPUs, our C kernels on CPUs, MLX's CUDA build), and of published fp16 FLOP/s it reaches on prompt rows.
BANDWIDTH_EFFICIENCY = {"mlx": 0.75, "cpu": 0.6, "cuda": 0.8}
FLOPS_EFFICIENCY = {"mlx": 0.5, "cpu": 0.4, "cuda": 0.5}
FORWARD_OVERHEAD_MS = {"mlx": 0.3, "cpu": 0.5, "cuda": 0.2}  # per forward: Python, kernel launches, decoding the hidden


@dataclass(frozen=True)
class Machine:
    name: str
    memory_gb: float  # RAM (VRAM for a GPU box)
    bandwidth_gbs: float  # published memory bandwidth
    tflops: float  # published fp16 (GPU) or fp32 (CPU) throughput
    backend: str  # mlx | cpu | cuda
    form: str  # laptop (leaves with its owner, has a battery) | desktop (stays on the desk) | server (lends always)
    share: float  # of an office's machines
    lendable: float = 0.65  # of memory a node may lend: what macOS lets the GPU wire, less the owner's apps

    @property
    def matmul_bytes_per_ms(self) -> float:
        return self.bandwidth_gbs * 1e6 * BANDWIDTH_EFFICIENCY[self.backend]

    @property
    def flops_per_ms(self) -> float:
        return self.tflops * 1e9 * FLOPS_EFFICIENCY[self.backend]

    @property
    def lent_bytes(self) -> int:
        return int(self.memory_gb * GB * self.lendable)


# Apple's published unified-memory bandwidths and GPU figures; a few Linux boxes. Shares: a plausible office.
MACHINES = (
    Machine("MacBook Air M1 8GB", 8, 68.25, 2.6, "mlx", "laptop", 0.10),
    Machine("MacBook Air M2 16GB", 16, 100, 3.6, "mlx", "laptop", 0.15),
    Machine("MacBook Air M3 24GB", 24, 100, 4.1, "mlx", "laptop", 0.10),
    Machine("MacBook Pro M1 Pro 16GB", 16, 200, 5.2, "mlx", "laptop", 0.08),
    Machine("MacBook Pro M2 Pro 32GB", 32, 200, 6.8, "mlx", "laptop", 0.12),
    Machine("MacBook Pro M3 Pro 18GB", 18, 150, 7.4, "mlx", "laptop", 0.08),
    Machine("MacBook Pro M3 Max 64GB", 64, 400, 16.4, "mlx", "laptop", 0.06),
    Machine("Mac mini M2 16GB", 16, 100, 3.6, "mlx", "desktop", 0.06),
    Machine("Mac mini M4 Pro 64GB", 64, 273, 9.2, "mlx", "desktop", 0.04),
    Machine("iMac M3 24GB", 24, 100, 4.1, "mlx", "desktop", 0.05),
    Machine("Mac Studio M2 Max 96GB", 96, 400, 13.6, "mlx", "desktop", 0.03),
    Machine("Mac Studio M2 Ultra 192GB", 192, 800, 27.2, "mlx", "desktop", 0.01),
    Machine("Mac Studio M3 Ultra 256GB", 256, 819, 28.4, "mlx", "desktop", 0.005),
    Machine("Linux desktop Ryzen 64GB DDR5", 64, 83, 1.5, "cpu", "desktop", 0.06, 0.6),
    Machine("Linux workstation RTX 4090 24GB", 24, 1008, 82.6, "cuda", "desktop", 0.03, 0.9),
    Machine("Linux server 2x EPYC 256GB", 256, 204, 3.0, "cpu", "server", 0.015, 0.75),
    Machine("ThinkPad Linux 32GB", 32, 77, 1.0, "cpu", "laptop", 0.01, 0.6),
)


@dataclass(frozen=True)
class Shape:
    """A model by its published shape and GGUF size: what the planner and the speed model need."""
    name: str
    n_layers: int
    dim: int
    n_kv_heads: int
    head_dim: int
    file_gb: float
    edge_gb: float  # embedding + LM head
    bits_per_weight: float = 4.85  # Q4_K_M

    def profile(self) -> ModelProfile:
        layer = int((self.file_gb - self.edge_gb) * GB / self.n_layers)
        return ModelProfile.from_sizes(self.name, self.n_layers, layer, int(self.edge_gb * GB), self.dim,
                                       self.n_kv_heads, self.head_dim)


SHAPES = {s.name: s for s in (
    Shape("8b-q4", 32, 4096, 8, 128, 4.92, 0.70),  # Llama 3.1 8B Q4_K_M
    Shape("32b-q4", 64, 5120, 8, 128, 19.9, 1.0),  # Qwen2.5 32B Q4_K_M
    Shape("70b-q4", 80, 8192, 8, 128, 42.5, 1.3),  # Llama 3.1 70B Q4_K_M
    Shape("405b-q4", 126, 16384, 8, 128, 243.0, 2.6),  # Llama 3.1 405B Q4_K_M
)}


def flops_per_row(model: ModelProfile, bits_per_weight: float = 4.85) -> float:
    """FLOPs of one layer on one row: two per weight."""
    return 2 * model.layer_bytes * 8 / bits_per_weight


@dataclass(frozen=True)
class Link:
    kind: str  # ethernet | wifi
    rtt_ms: float  # this node's median round trip to the gateway
    sigma: float  # lognormal spread of each hop around it
    bandwidth_bytes_per_s: float

    def hop_ms(self, rng: random.Random, nbytes: int) -> float:
        """One push into this node: half a round trip drawn around its median, plus the bytes over its link."""
        return self.rtt_ms / 2 * rng.lognormvariate(0.0, self.sigma) + 1000 * nbytes / self.bandwidth_bytes_per_s


def draw_link(rng: random.Random, wifi: bool) -> Link:
    """Switched gigabit Ethernet in one building: ~0.35 ms round trips; office Wi-Fi: ~3 ms with a long tail."""
    if wifi:
        return Link("wifi", 3.0 * rng.lognormvariate(0, 0.4), 0.7, rng.uniform(25e6, 60e6))
    return Link("ethernet", 0.35 * rng.lognormvariate(0, 0.3), 0.3, 117e6)


# --- an owner's day ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Day:
    """When the owner uses the machine (`busy`) and when it is awake (`awake`: a laptop while it is in the building
    and not at a meeting; a desktop all day, or from arrival to departure if it is shut down at night). Times in
    seconds on the simulation's clock."""
    busy: tuple[tuple[float, float], ...]
    awake: tuple[tuple[float, float], ...]
    plugged: bool  # a laptop on its charger at the desk (otherwise on battery all day)


def _clock(rng: random.Random, hour: float, sigma_min: float) -> float:
    return (hour + rng.gauss(0, sigma_min / 60)) * HOUR


def owner_day(rng: random.Random, form: str, day_start: float) -> Day:
    """One working day: arrive ~9:00, leave ~18:00, lunch ~12:30, a few meetings and coffee breaks; 8% of days off.
    A laptop goes along to meetings and home (asleep, off the pool); a desktop stays, idle, and is lent."""
    whole = ((day_start, day_start + 24 * HOUR),)
    if form == "server":
        return Day((), whole, True)
    if rng.random() < 0.08:  # holiday, sick, working from home
        return Day((), () if form == "laptop" else whole, False)
    arrive, leave = _clock(rng, 9.0, 40), _clock(rng, 18.0, 60)
    away: list[tuple[float, float, bool]] = []  # (start, end, takes the laptop)
    lunch = _clock(rng, 12.5, 30)
    away.append((lunch, lunch + rng.uniform(30, 60) * 60, rng.random() < 0.2))
    for _ in range(rng.choice((0, 1, 1, 2, 2, 3))):
        start = rng.uniform(arrive, leave - HOUR)
        away.append((start, start + rng.choice((30, 30, 45, 60)) * 60, True))
    t = arrive
    while (t := t + rng.expovariate(1 / (100 * 60))) < leave:
        away.append((t, t + rng.expovariate(1 / (9 * 60)), False))  # coffee, a chat, the toilet
    away.sort()
    busy, awake, t = [], [], arrive
    laptop_out = []
    for start, end, takes in away:
        if start > t:
            busy.append((t, min(start, leave)))
        if takes:
            laptop_out.append((start, end))
        t = max(t, end)
    if t < leave:
        busy.append((t, leave))
    if form == "laptop":
        t = arrive
        for start, end in laptop_out:
            if start > t:
                awake.append((t, start))
            t = max(t, end)
        if t < leave:
            awake.append((t, leave))
    else:
        off = rng.random() < 0.15  # shut down at night
        awake.append((arrive, leave) if off else (0.0, 24 * HOUR))
    shift = lambda spans: tuple((a + day_start, b + day_start) for a, b in spans if b > a)  # noqa: E731
    return Day(shift(busy), shift(awake), rng.random() < 0.7)


def laptop_policy(rng: random.Random) -> LendPolicy:
    """What laptop owners ask for: a quarter only on mains, half down to 30% battery, the rest the default."""
    x = rng.random()
    if x < 0.25:
        return LendPolicy(require_ac=True)
    if x < 0.75:
        return LendPolicy(min_battery=30.0)
    return LendPolicy()


def diurnal_demand(t: float) -> float:
    """Requests at time t as a fraction of the peak rate: people ask while they work."""
    hour = (t / HOUR) % 24
    if 9 <= hour < 12 or 13.5 <= hour < 18:
        return 1.0
    if 12 <= hour < 13.5:
        return 0.6
    if 7 <= hour < 9:
        return 0.2 + 0.4 * (hour - 7)
    if 18 <= hour < 22:
        return 0.5 - 0.1 * (hour - 18)
    return 0.05


def draw_lengths(rng: random.Random) -> tuple[int, int]:
    """(prompt tokens, answer tokens): lognormal, as chat and RAG traffic is (long prompts, shorter answers)."""
    prompt = int(min(3000, max(8, rng.lognormvariate(math.log(300), 1.0))))
    answer = int(min(1024, max(8, rng.lognormvariate(math.log(200), 0.8))))
    return prompt, answer

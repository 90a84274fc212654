"""What `run_audit` measured: rows, a table for people, one JSON object, a PNG plot."""

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class AuditReport:
    model: str
    architecture: str
    n_layers: int
    vocab_size: int
    # prefix side: {"depth", "attacker", "recovery", "secret_recovery"}; depth = layers the gateway keeps
    # before the first node, recovery = fraction of the held-out prompts' tokens that attacker got right,
    # secret_recovery = the same over the PIN's and passwords' tokens (None when there are none)
    rows: list[dict[str, Any]]
    # suffix side: {"depth", "attacker", "recovery"}; depth = layers the gateway keeps at the end,
    # recovery = fraction of positions whose next token (the answer) the node before them gets right
    suffix_rows: list[dict[str, Any]]
    tokens: int  # held-out tokens scored
    secret_tokens: int
    sequences: int
    training_tokens: int  # the attackers' own text: corpus + random sequences
    candidates: int  # SipIt's budget per position
    wire_dtype: str
    seconds: float  # wall-clock time of the audit
    cpu_seconds: float  # compute time of its process (the wall-clock time, on a machine running nothing else)
    notes: list[str] = field(default_factory=list)  # what was subsampled, what was assumed
    examples: list[dict[str, Any]] = field(default_factory=list)  # {"depth", "attacker", "text"} recovered

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def recovery(self, depth: int, attacker: str) -> float:
        return next(r["recovery"] for r in self.rows if r["depth"] == depth and r["attacker"] == attacker)

    def best(self, depth: int) -> float:
        """The most any attacker recovered at this privacy-prefix depth."""
        return max(r["recovery"] for r in self.rows if r["depth"] == depth)

    def table(self) -> str:
        return "\n".join([
            f"{self.model} ({self.architecture}, {self.n_layers} layers, vocabulary {self.vocab_size}): "
            f"{self.tokens} held-out tokens in {self.sequences} sequences ({self.secret_tokens} of PINs and "
            f"passwords), attackers fitted on {self.training_tokens} tokens of their own, SipIt trying up to "
            f"{self.candidates} candidates a position, hidden states as {self.wire_dtype}; "
            f"{self.seconds:.0f} s ({self.cpu_seconds:.0f} s of CPU)",
            "",
            "prompt tokens a node recovers, by privacy prefix (layers the gateway keeps first)",
            _grid(self.rows, "recovery", secrets=any(r["secret_recovery"] is not None for r in self.rows)),
            "",
            "answer tokens the node before the gateway's last layers recovers, by privacy suffix",
            _grid(self.suffix_rows, "recovery", secrets=False),
            *([""] + [f"note: {n}" for n in self.notes] if self.notes else []),
        ])

    def plot(self, path: str | Path) -> Path:
        """A PNG of both tables (matplotlib, the `audit` extra: pip install 'duskpool[audit]')."""
        try:
            import matplotlib
        except ImportError:
            raise RuntimeError("the plot needs matplotlib: pip install 'duskpool[audit]'") from None
        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for axes, rows, title in ((left, self.rows, "prompt: privacy prefix (layers kept first)"),
                                  (right, self.suffix_rows, "answer: privacy suffix (layers kept last)")):
            for attacker in dict.fromkeys(r["attacker"] for r in rows):
                mine = [r for r in rows if r["attacker"] == attacker]
                line, = axes.plot([r["depth"] for r in mine], [r["recovery"] for r in mine], marker="o",
                                  label=attacker)
                if any(r.get("secret_recovery") is not None for r in mine):
                    axes.plot([r["depth"] for r in mine], [r["secret_recovery"] for r in mine], linestyle=":",
                              marker="x", color=line.get_color(), label=f"{attacker}: PINs, passwords")
            axes.set_title(title, fontsize=10)
            axes.set_xlabel("layers the gateway keeps")
            axes.set_xticks(sorted({r["depth"] for r in rows}))
            axes.set_ylim(-0.02, 1.02)
            axes.grid(alpha=0.3)
            axes.legend(fontsize=8)
        left.set_ylabel("fraction of tokens a node recovers")
        figure.suptitle(f"duskpool audit: {self.model}", fontsize=11)
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path


def _grid(rows: list[dict[str, Any]], key: str, secrets: bool) -> str:
    attackers = list(dict.fromkeys(r["attacker"] for r in rows))
    depths = sorted({r["depth"] for r in rows})
    cell = {(r["depth"], r["attacker"]): r for r in rows}
    width = max(14, *(len(a) + 2 for a in attackers))
    lines = ["depth".ljust(7) + "".join(a.rjust(width) for a in attackers)]
    for depth in depths:
        values = []
        for attacker in attackers:
            row = cell.get((depth, attacker))
            text = "-" if row is None else f"{row[key]:.0%}"
            if row is not None and secrets and row.get("secret_recovery") is not None:
                text += f" ({row['secret_recovery']:.0%})"
            values.append(text.rjust(width))
        lines.append(str(depth).ljust(7) + "".join(values))
    if secrets:
        lines.append("(in brackets: the tokens of PINs and passwords)")
    return "\n".join(lines)

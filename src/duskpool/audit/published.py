"""Audits already run and shipped with duskpool (audited.json: copied from `duskpool audit` runs, as
docs/privacy.md shows them), so the gateway can say what a node could recover at its setting without
spending minutes on an audit at every start."""

import json
from functools import cache
from pathlib import Path


@cache
def _published() -> dict:
    return json.loads(Path(__file__).with_name("audited.json").read_text())


def prefix_recovery(model_name: str, depth: int) -> dict[str, float] | None:
    """Fraction of prompt tokens each attacker recovered at privacy prefix `depth` on the model file named
    `model_name`, or None where no shipped audit covers it."""
    return _published().get(model_name, {}).get("prefix", {}).get(str(depth))


def privacy_line(model_name: str, depth: int) -> str:
    """One line for the gateway's start: what a node sees, and what the audit measured at this depth."""
    seen = f"nodes see the hidden states after layer {depth}" if depth else "nodes see the embeddings"
    rates = prefix_recovery(model_name, depth)
    if rates is None:
        return (f"duskpool: privacy: {seen}; this model is not audited here: `duskpool audit --model ...` "
                f"measures what a node could recover (docs/privacy.md)")
    measured = ", ".join(f"{attacker} {rate:.0%}" for attacker, rate in rates.items())
    return (f"duskpool: privacy: {seen}; at --privacy-prefix {depth} an attacker holding the public weights "
            f"recovered this share of prompt tokens in duskpool's audit: {measured} (docs/privacy.md)")

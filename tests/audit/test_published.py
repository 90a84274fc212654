"""The audit the gateway quotes at start is the one docs/privacy.md shows, and it covers the default prefix."""

from pathlib import Path

from duskpool.audit.published import prefix_recovery
from duskpool.cli.parser import build_parser
from duskpool.weights.catalog import BUNDLED_FILE

DOCS = Path(__file__).parents[2] / "docs" / "privacy.md"


def test_the_shipped_audit_is_the_documented_one_and_covers_the_default():
    default = build_parser().parse_args(["swarm"]).privacy_prefix
    assert prefix_recovery(BUNDLED_FILE, default) is not None
    table = DOCS.read_text()
    for depth in range(7):  # each row of the prompt table: "depth  nearest (secret)  learned (secret)  sipit (secret)"
        shipped = [f"{rate:.0%}" for rate in prefix_recovery(BUNDLED_FILE, depth).values()]
        documented = next(line.split() for line in table.splitlines() if line.startswith(f"{depth}   "))
        assert [cell for cell in documented if cell.endswith("%") and "(" not in cell] == shipped, depth

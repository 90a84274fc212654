"""The privacy audit: its attacks work where they must, and its numbers come from the model it is given."""

import json
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from duskpool.audit import attacks, run_audit
from duskpool.audit.batching import BatchOps
from duskpool.models import load_model
from duskpool.weights.gguf import GGUFFile
from tests.conftest import write_tiny_llama

ATTACKERS = {"nearest", "learned", "sipit"}


def tiny(tmp_path: Path, seed: int, layers: int = 3) -> Path:
    return write_tiny_llama(tmp_path / f"tiny-{seed}.gguf", Q.Q8_0, layers=layers, seed=seed)


@pytest.mark.slow
def test_at_depth_0_nearest_neighbour_recovers_the_prompt(bundled_model: Path):
    """Depth 0 hands nodes the embedding rows themselves: the table lookup must read the prompt back."""
    report = run_audit(bundled_model, max_prefix=0, max_suffix=None, corpus_tokens=256, random_sequences=1)
    assert report.tokens > 100 and report.secret_tokens > 0
    nearest = report.recovery(0, "nearest")
    assert nearest >= 0.95, f"nearest neighbour recovered {nearest:.0%} of the embedded prompt's tokens"
    assert {r["attacker"] for r in report.rows} == ATTACKERS
    pin_prompt = next(e["text"] for e in report.examples if e["attacker"] == "nearest")
    assert "4921" in pin_prompt, f"the PIN is not in what the attacker read back: {pin_prompt!r}"


def test_two_models_give_two_tables(tmp_path: Path):
    """Nothing is written in: a different model (random weights, another seed) gives different numbers."""
    held = [list(range(3, 40, 3)), [7, 1, 500, 22, 9, 9, 310, 64, 2, 77, 120, 33]]
    tables = []
    for seed in (0, 1):
        report = run_audit(tiny(tmp_path, seed), max_prefix=3, max_suffix=1, held_out=held, candidates=8)
        assert {(r["depth"], r["attacker"]) for r in report.rows} == {(d, a) for d in range(4) for a in ATTACKERS}
        assert all(0 <= r["recovery"] <= 1 for r in report.rows + report.suffix_rows)
        assert report.tokens == sum(map(len, held))
        assert "nearest" in report.table() and "public-layers" in report.table()
        tables.append([(r["depth"], r["attacker"], r["recovery"]) for r in report.rows + report.suffix_rows])
    assert tables[0] != tables[1], f"two different models gave the same table: {tables[0]}"


def test_alternative_rows_are_each_one_decode_step_after_the_prefix(tmp_path: Path):
    """BatchOps: a batch of candidates at position p equals decoding each of them alone after the prefix."""
    ops = BatchOps()
    model = load_model(GGUFFile(tiny(tmp_path, 0)), ops)
    cache = model.new_cache(16)
    model.forward_span(model.embed([5, 17, 300, 41]), cache, 0)
    candidates = [3, 99, 250, 7, 511]
    one_by_one = torch.cat([model.forward_span(model.embed([c]), cache, 4) for c in candidates])
    with ops.alternatives():
        batched = model.forward_span(model.embed(candidates), cache, 4)
    torch.testing.assert_close(batched, one_by_one, rtol=1e-4, atol=1e-4)
    alone = torch.cat([model.forward_span(model.embed([c]), model.new_cache(1), 0) for c in candidates])
    torch.testing.assert_close(next(attacks.propagate(model.embed(candidates), [model], ops)), alone,
                               rtol=1e-4, atol=1e-4)


def test_sipit_inverts_exactly_when_the_token_is_among_its_candidates(tmp_path: Path):
    ops = BatchOps()
    file = GGUFFile(tiny(tmp_path, 0))
    edge = load_model(file, ops, range(0), embed=True, head=False)
    layers = [load_model(file, ops, range(i, i + 1), embed=False, head=False) for i in range(3)]
    tokens = [12, 400, 400, 3, 77, 256, 1]
    observed = attacks.through(layers, edge.embed(tokens))
    decoys = torch.randint(0, 512, (len(tokens), 16), generator=torch.Generator().manual_seed(0))
    ranked = torch.cat([decoys[:, :9], torch.tensor(tokens)[:, None], decoys[:, 9:]], dim=1)  # truth 10th
    assert attacks.sipit(tokens, observed, ranked, set(), edge, layers, ops, tolerance=1e-3) == tokens


def test_duskpool_audit_prints_one_json_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from duskpool.cli.main import main

    plot = tmp_path / "audit.png"
    argv = ["audit", "--model", str(tiny(tmp_path, 0, layers=2)), "--max-prefix", "1", "--max-suffix", "1", "--json"]
    assert main(argv + (["--plot", str(plot)] if _has_matplotlib() else [])) == 0
    report = json.loads(capsys.readouterr().out)
    assert {(r["depth"], r["attacker"]) for r in report["rows"]} == {(d, a) for d in (0, 1) for a in ATTACKERS}
    assert {r["depth"] for r in report["suffix_rows"]} == {0, 1}
    assert not _has_matplotlib() or plot.read_bytes()[:4] == b"\x89PNG"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_packed_sequences_are_each_computed_alone(tmp_path: Path):
    ops = BatchOps()
    model = load_model(GGUFFile(tiny(tmp_path, 0)), ops)
    sequences = [[5, 17, 300, 41], [9], [100, 200, 300, 400, 500, 1, 2]]
    alone = torch.cat([attacks.through([model], model.embed(s)) for s in sequences])
    with ops.packed([len(s) for s in sequences]):
        packed = model.forward_span(model.embed([t for s in sequences for t in s]), model.new_cache(12), 0)
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)

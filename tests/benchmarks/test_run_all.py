"""benchmarks/run_all.py's table: each bar's row says its figure, its reference, the ratio and whether it was met."""

from benchmarks.run_all import Missing, Row, render


def table_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]  # past the column names and the rule


def test_a_ratio_bar_is_met_or_missed_on_the_ratio():
    rows = [Row("decode", 33.0, "tok/s", 30.0, "llama.cpp", ">=", 1.1),
            Row("prefill", 120.0, "tok/s", 100.0, "transformers bf16", ">=", 1.0)]
    decode, prefill = table_rows(render(rows, ["# t"], cpus=16))
    assert decode == ["decode", "33 tok/s", "30 tok/s (llama.cpp)", "1.10×", "≥ 1.1×", "yes"]
    assert prefill[3:] == ["1.20×", "≥ 1×", "yes"]
    assert table_rows(render([Row("decode", 32.0, "tok/s", 30.0, "llama.cpp", ">=", 1.1)], [], 16))[0][-1] == "no"


def test_an_absolute_bar_holds_on_the_figure_and_the_ratio_is_shown_beside_it():
    hop = Row("hop", 300.0, "µs", 20.0, "raw TCP", "<=", 250, bar_on="figure")
    (cells,) = table_rows(render([hop], [], cpus=16))
    assert cells[1:] == ["300 µs", "20 µs (raw TCP)", "15.00×", "≤ 250 µs", "no"]


def test_a_bar_needing_a_core_per_process_is_marked_where_the_cpus_are_fewer():
    ring = Row("ring", 9.0, "tok/s", 10.0, "single process", ">=", 0.85, core_per_process=4)
    assert table_rows(render([ring], [], cpus=16))[0][-1] == "yes"
    assert table_rows(render([ring], [], cpus=2))[0][-1] == "yes (needs a core per process: 4 processes, 2 CPUs)"


def test_a_benchmark_that_failed_is_a_row_saying_why():
    (cells,) = table_rows(render([Missing("decode-1b", "exit code 1: boom")], ["# t"], cpus=2))
    assert cells == ["decode-1b", "not measured", "exit code 1: boom", "", "", "—"]

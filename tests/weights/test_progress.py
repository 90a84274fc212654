"""Progress: plain lines on stderr when it is not a terminal, a rich bar when it is, nothing when disabled."""

import io

from duskpool.weights.progress import Progress


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(text: str) -> list[str]:
    return text.splitlines()


def test_plain_lines_at_start_each_tenth_and_end_on_stderr(capsys):
    clock = Clock()
    bar = Progress("weights -> node", 100_000_000, clock=clock)
    for _ in range(10):
        clock.now += 2.0  # 10 MB every 2 s: each tenth is a line
        bar.advance(10_000_000)
    bar.close()
    out, err = capsys.readouterr()
    assert out == "", "progress must keep stdout for the answer"
    assert lines(err) == [
        "duskpool: weights -> node: 100.0 MB to go",
        *[f"duskpool: weights -> node: {10 * i}.0 MB of 100.0 MB ({10 * i}%), 5.0 MB/s, ETA {2 * (10 - i)}.0 s"
          for i in range(1, 10)],
        "duskpool: weights -> node: done, 100.0 MB in 20.0 s, 5.0 MB/s",
    ]


def test_plain_lines_at_most_one_a_second(capsys):
    clock = Clock()
    with Progress("load", 2_000_000_000, clock=clock) as bar:
        for _ in range(20):  # a tenth every 0.5 s: lines come once a second, not at every tenth
            clock.now += 0.25
            bar.advance(100_000_000)
    assert lines(capsys.readouterr().err) == [
        "duskpool: load: 2.00 GB to go",
        "duskpool: load: 400.0 MB of 2.00 GB (20%), 400.0 MB/s, ETA 4.0 s",
        "duskpool: load: 800.0 MB of 2.00 GB (40%), 400.0 MB/s, ETA 3.0 s",
        "duskpool: load: 1.20 GB of 2.00 GB (60%), 400.0 MB/s, ETA 2.0 s",
        "duskpool: load: 1.60 GB of 2.00 GB (80%), 400.0 MB/s, ETA 1.0 s",
        "duskpool: load: done, 2.00 GB in 5.0 s, 400.0 MB/s",  # no separate line at 100 %
    ]


def test_a_slow_transfer_still_prints_every_ten_seconds(capsys):
    clock = Clock()
    bar = Progress("slow", 1_000_000_000, clock=clock)
    for _ in range(30):  # 1 MB/s: a tenth takes 100 s
        clock.now += 1.0
        bar.advance(1_000_000)
    err = lines(capsys.readouterr().err)
    assert err[1:] == ["duskpool: slow: 10.0 MB of 1.00 GB (1%), 1.0 MB/s, ETA 16 min 30 s",
                       "duskpool: slow: 20.0 MB of 1.00 GB (2%), 1.0 MB/s, ETA 16 min 20 s",
                       "duskpool: slow: 30.0 MB of 1.00 GB (3%), 1.0 MB/s, ETA 16 min 10 s"]


def test_an_unfinished_transfer_ends_with_how_far_it_got(capsys):
    clock = Clock()
    with Progress("cut", 50_000_000, clock=clock) as bar:
        clock.now += 0.5
        bar.advance(20_000_000)
    bar.close()  # a second close says nothing more
    assert lines(capsys.readouterr().err) == ["duskpool: cut: 50.0 MB to go",
                                              "duskpool: cut: ended at 20.0 MB of 50.0 MB after 0.5 s, 40.0 MB/s"]


def test_disabled_prints_nothing(capsys):
    bar = Progress("quiet", 10, enabled=False)
    bar.advance(10)
    bar.close()
    assert capsys.readouterr() == ("", "")


def test_plain_lines_reach_file_descriptor_2(capfd):
    with Progress("fd", 1000) as bar:
        bar.advance(1000)
    out, err = capfd.readouterr()
    assert out == "" and err.startswith("duskpool: fd: 0.0 MB to go\nduskpool: fd: done, 0.0 MB in ")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_rich_bar_not_lines():
    terminal = Terminal()
    with Progress("to the terminal", 5_000_000, stream=terminal) as bar:
        bar.advance(5_000_000)
    shown = terminal.getvalue()
    assert "to the terminal" in shown and "5.0 MB" in shown, shown
    assert "duskpool:" not in shown, "a terminal gets the bar, not the plain lines"

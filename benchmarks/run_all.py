"""Every bar of issue 17 in one table: each benchmark runs as a subprocess with --json, and its figures become rows
of benchmarks/README.md, each a ratio to a reference measured in the same run.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only NAME ...] [--out benchmarks/README.md]

The benchmarks run from HEAD as committed (a `git archive` of it in a temp folder, with its src/ first on
PYTHONPATH), so the table measures the commit it names even while the work tree is mid-edit; --working-tree
measures the work tree instead. NAME is one of: trace, ring-bundled, ring-1b, decode-bundled, decode-1b,
transfer, memory, long-prompt.
--quick runs shorter decodes, a smaller transfer, and the memory and long-prompt benchmarks on the 1B shape
instead of the 8B one the bars are set for (the table says which shape each row used). A bar that needs a core
per process is marked when this machine has fewer CPUs than the benchmark runs processes: it is not a fair test
there. The machine's load average is read before and after each benchmark: other work on the machine moves every
multi-process figure.
"""

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TIMEOUT_S = 45 * 60  # one benchmark still running after this is stopped and reported as not measured


@dataclass
class Row:
    """One bar: a figure beside its reference from the same run; the bar holds on the ratio or on the figure."""
    what: str
    figure: float
    unit: str
    reference: float | None  # None: nothing comparable was measured (the bar is absolute)
    reference_name: str
    bar_op: str  # "<=" or ">="
    bar: float
    bar_on: str = "ratio"  # "ratio" or "figure"
    core_per_process: int = 0  # processes that each need a core of their own for the bar to be fair; 0: none
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.figure / self.reference if self.reference else None

    @property
    def met(self) -> bool:
        value = self.ratio if self.bar_on == "ratio" else self.figure
        return value is not None and (value <= self.bar if self.bar_op == "<=" else value >= self.bar)


@dataclass
class Missing:
    """A bar whose benchmark did not give a figure."""
    what: str
    why: str


def number(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def cells(row: Row | Missing, cpus: int) -> list[str]:
    """The table's cells for one row: what, figure, reference, ratio, bar, met?"""
    if isinstance(row, Missing):
        return [row.what, "not measured", row.why, "", "", "—"]
    sign = "≤" if row.bar_op == "<=" else "≥"
    bar = f"{sign} {row.bar:g}×" if row.bar_on == "ratio" else f"{sign} {number(row.bar)} {row.unit}"
    reference = f"{number(row.reference)} {row.unit} ({row.reference_name})" if row.reference else row.reference_name
    met = "yes" if row.met else "no"
    if row.core_per_process and cpus < row.core_per_process:
        met += f" (needs a core per process: {row.core_per_process} processes, {cpus} CPUs)"
    what = f"{row.what} ({row.note})" if row.note else row.what
    return [what, f"{number(row.figure)} {row.unit}", reference, f"{row.ratio:.2f}×" if row.ratio else "",
            bar, met]


def render(rows: list[Row | Missing], header: list[str], cpus: int, footer: list[str] = ()) -> str:
    """The README: the header lines, one Markdown table of `rows`, the footer lines."""
    table = ["| what | figure | reference | ratio | bar | met? |", "| --- | ---: | --- | ---: | --- | --- |"]
    table += ["| " + " | ".join(c.replace("|", "/") for c in cells(r, cpus)) + " |" for r in rows]
    return "\n".join([*header, "", *table, "", *footer]).rstrip() + "\n"


# --- the benchmarks --------------------------------------------------------------------------------------------

def raw_tcp_oneway_us(size: int = 2304, rounds: int = 2000) -> float:
    """Half the median round trip of `size` bytes between this process and an echo process over loopback TCP:
    the hop's floor (a bundled-model hidden state, 576 floats, is 2304 bytes)."""
    echo = subprocess.Popen([sys.executable, "-c", (
        "import socket,sys\n"
        "s=socket.create_server(('127.0.0.1',0));print(s.getsockname()[1],flush=True)\n"
        "c,_=s.accept();c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\n"
        f"n={size}\n"
        "while True:\n"
        " b=b''\n"
        " while len(b)<n:\n"
        "  d=c.recv(n-len(b))\n"
        "  if not d: sys.exit()\n"
        "  b+=d\n"
        " c.sendall(b)\n")], stdout=subprocess.PIPE, text=True)
    try:
        port = int(echo.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            message, times = b"x" * size, []
            for _ in range(rounds):
                started = time.perf_counter()
                conn.sendall(message)
                got = 0
                while got < size:
                    got += len(conn.recv(size - got))
                times.append(time.perf_counter() - started)
        return statistics.median(times) / 2 * 1e6
    finally:
        echo.kill()
        echo.wait()


def ring_rows(name: str, f: dict, bar: float) -> list[Row]:
    three = next(s for s in f["setups"] if s["stages"] == 3 and s["routing"] == "ring")
    return [Row(f"3-stage ring decode, {name}", three["tok_s"], "tok/s", f["single"]["tok_s"], "single process",
                ">=", bar, core_per_process=4, note=f"{f['threads']} threads per process")]


def decode_rows(name: str, f: dict, prefill: bool) -> list[Row | Missing]:
    engines, rows = f["engines"], []
    ours = engines.get("duskpool")
    if ours is None:
        return [Missing(f"decode, {name}", "duskpool's run failed")]
    if "llama.cpp" in engines:
        rows.append(Row(f"decode, {name}", ours["decode_tok_s"], "tok/s", engines["llama.cpp"]["decode_tok_s"],
                        "llama.cpp, same GGUF and threads", ">=", 1.1, note=f"{f['threads']} threads"))
    else:
        rows.append(Missing(f"decode, {name}", "llama.cpp did not run (its log says why)"))
    if prefill:
        what = f"prefill {f['prompt_tokens']} tokens, {name}"
        if "transformers-bf16" in engines:
            rows.append(Row(what, ours["prefill_tok_s"], "tok/s", engines["transformers-bf16"]["prefill_tok_s"],
                            "transformers bf16", ">=", 1.0, note=f"{f['threads']} threads"))
        else:
            rows.append(Missing(what, "transformers bf16 did not run"))
    return rows


def hop_rows(f: dict, oneway_us: float) -> list[Row]:
    return [Row("hop: transit + Python per hop, 3-stage ring, bundled model", f["hop_us"], "µs", oneway_us,
                "raw TCP one-way, loopback", "<=", 250, bar_on="figure", core_per_process=f["stages"] + 1,
                note=f"transit {f['transit_us_per_hop']:.0f} + Python {f['python_us_per_hop']:.0f} µs; "
                     f"ring {f['ring_tok_s']:.1f} vs single {f['single_tok_s']:.1f} tok/s")]


def transfer_rows(f: dict) -> list[Row]:
    best = max(f["runs"], key=lambda r: r["mb_s"])
    return [Row(f"weights over loopback mTLS, {f['mb']:.0f} MB span", best["mb_s"], "MB/s", best["raw_mb_s"],
                "raw TLS socket copy", ">=", 1000, bar_on="figure", note=f"best of {len(f['runs'])}")]


def memory_rows(f: dict) -> list[Row]:
    worst = max(f["nodes"], key=lambda n: n["ratio"])
    g, e = f["gateway"], f["empty_node"]["rss"]
    return [Row(f"node RSS, {f['model']}, {f['stages']} nodes (the worst)", worst["rss"]["rss"], "MB",
                worst["bound_mb"], f"empty node {e:.0f} + 1.1 × ({worst['weights_mb']:.0f} weights + "
                f"{worst['kv_mb']:.0f} KV)", "<=", 1.0,
                note=f"layers {worst['layers'][0]}-{worst['layers'][1] - 1}, context {f['context']}; "
                     f"anon {worst['rss']['anon']:.0f}, file {worst['rss']['file']:.0f}, "
                     f"peak {worst['rss']['peak']:.0f}"),
            Row(f"gateway RSS, {f['model']}", g["now"]["rss"], "MB", g["bound_mb"],
                f"baseline {g['baseline']['rss']:.0f} + 1.1 × ({g['own_weights_mb']:.0f} own weights + "
                f"{g['own_kv_mb']:.0f} KV) + {f['buffer_mb']} buffer", "<=", 1.0,
                note=f"anon {g['now']['anon']:.0f}, file {g['now']['file']:.0f}, peak {g['now']['peak']:.0f}")]


def long_prompt_rows(f: dict) -> list[Row]:
    return [Row(f"TTFT of a {f['prompt_tokens']}-token prompt, {f['stages']}-stage ring, {f['model']}",
                f["ring_ttft_ms"], "ms", f["single_ttft_ms"], "single process", "<=", 1.2,
                core_per_process=f["processes"], note=f"{f['threads']} threads per process, best of "
                                                      f"{len(f['ring_runs_ms'])}")]


def plans(quick: bool, model_1b: str) -> dict:
    """name -> (argv after the interpreter, the rows made from its JSON)."""
    q = quick
    return {
        "trace": (["pipeline_trace.py", "--stages", "3", "--tokens", "32" if q else "64"],
                  lambda f: hop_rows(f, raw_tcp_oneway_us())),
        "ring-bundled": (["pipeline.py", "--max-stages", "3", "--tokens", "32" if q else "64"],
                         lambda f: ring_rows("bundled model", f, 0.85)),
        "ring-1b": (["pipeline.py", "--model", model_1b, "--max-stages", "3", "--tokens", "16" if q else "32"],
                    lambda f: ring_rows("1B-shaped Q4_0", f, 0.93)),
        "decode-bundled": (["decode.py", "--engines", "duskpool,llama.cpp,transformers-bf16",
                            "--tokens", "64" if q else "128", "--prompt-tokens", "512"],
                           lambda f: decode_rows("bundled model", f, prefill=True)),
        "decode-1b": (["decode.py", "--model", model_1b, "--engines", "duskpool,llama.cpp",
                       "--tokens", "32" if q else "64", "--prompt-tokens", "128"],
                      lambda f: decode_rows("1B-shaped Q4_0", f, prefill=False)),
        "transfer": (["transfer.py", "--mb", "128" if q else "512", "--runs", "2" if q else "3"], transfer_rows),
        "memory": (["memory.py", "--shape", "1b" if q else "8b"], memory_rows),
        "long-prompt": (["long_prompt.py", *(["--shape", "1b", "--runs", "1"] if q else ["--shape", "8b"])],
                        long_prompt_rows),
    }


def export_head(into: Path) -> None:
    """HEAD's files as committed (git archive) into `into`: the code the table's commit names, whatever the work
    tree holds (others may be mid-edit there: a kernel that does not compile yet falls back to numpy)."""
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def run(argv: list[str], tree: Path, log: Path) -> tuple[dict | None, str]:
    """Run one benchmark of `tree` (a checkout: its benchmarks/ and src/) with --json; its figures (the last JSON
    line) or None, and why not."""
    command = [sys.executable, str(tree / "benchmarks" / argv[0]), *argv[1:], "--json"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree / "src"), os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as out:
        try:
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=out, text=True, timeout=TIMEOUT_S,
                                  cwd=tree, env=env)
        except subprocess.TimeoutExpired:
            return None, f"stopped after {TIMEOUT_S} s"
        out.write(done.stdout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    print("\n".join(line for line in done.stdout.splitlines() if not line.startswith("{")), flush=True)
    if done.returncode != 0 or not lines:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        return None, f"exit code {done.returncode}: {tail[0][:200]}"
    return json.loads(lines[-1]), ""


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = ""
    try:
        import psutil
        memory = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        pass
    return f"{model}, {os.cpu_count()} CPUs{memory}, {platform.platform()}, Python {platform.python_version()}"


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def commit(working_tree: bool) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD")
    if not working_tree:
        return f"{head}, as committed (run from a `git archive` of it)"
    changed = git("status", "--porcelain", "--", "src", "benchmarks")
    return head + (", with the work tree's uncommitted changes in src/ or benchmarks/" if changed else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs, 1B shape for memory and long prompts")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    parser.add_argument("--out", type=Path, default=HERE / "README.md")
    parser.add_argument("--working-tree", action="store_true",
                        help="measure the work tree as it is (default: HEAD as committed, exported to a temp folder)")
    args = parser.parse_args()
    started, load_before = datetime.datetime.now(datetime.UTC), load()
    cpus = os.cpu_count() or 1
    runs: list[str] = []
    with tempfile.TemporaryDirectory(prefix="duskpool-run-all-") as tmp:
        sys.path.insert(0, str(ROOT))
        from benchmarks.random_gguf import SHAPES, write_model

        tree = ROOT
        if not args.working_tree:
            tree = Path(tmp) / "head"
            tree.mkdir()
            export_head(tree)
        logs = Path(tempfile.mkdtemp(prefix="duskpool-run-all-logs-"))  # kept: each benchmark's whole output
        print(f"logs in {logs}", flush=True)
        todo = plans(args.quick, str(Path(tmp) / "llama-1b-q4_0.gguf"))
        unknown = set(args.only or ()) - set(todo)
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; known: {', '.join(todo)}")
        names = [n for n in todo if not args.only or n in args.only]
        found: dict[str, list[Row | Missing]] = {}
        if any("--model" in todo[n][0] for n in names):
            write_model(Path(tmp) / "llama-1b-q4_0.gguf", **SHAPES["1b"])
        for name in sorted(names, key=lambda n: n.startswith("decode")):  # decode last: llama.cpp loads slowest
            argv, make_rows = todo[name]
            print(f"== {name}: {' '.join(argv)}", flush=True)
            before, t0 = load(), time.perf_counter()
            figures, why = run(argv, tree, logs / f"{name}.log")
            seconds, after = time.perf_counter() - t0, load()
            shown = " ".join(a if not a.startswith(tmp) else "<1b.gguf>" for a in argv)
            runs.append(f"- `{name}`: `benchmarks/{shown} --json`, {seconds:.0f} s, load {before} → {after}")
            try:
                found[name] = make_rows(figures) if figures is not None else [Missing(name, why)]
            except (KeyError, StopIteration, TypeError) as e:  # figures without what the row needs
                found[name] = [Missing(name, f"its JSON lacks {e!r}")]
    rows = [row for name in names for row in found[name]]  # in issue 17's order
    minutes = (datetime.datetime.now(datetime.UTC) - started).total_seconds() / 60
    command = "benchmarks/run_all.py" + (" --quick" if args.quick else "") + (
        " --working-tree" if args.working_tree else "") + (
        f" --only {' '.join(args.only)}" if args.only else "")
    header = [
        "# Benchmarks: issue 17's bars",
        "",
        f"Generated by `.venv/bin/python {command}` — regenerate with the same command; each row's figure and",
        "reference come from this one run, on this one machine.",
        "",
        f"- machine: {machine()}",
        f"- date: {started:%Y-%m-%d %H:%M} UTC, took {minutes:.0f} min",
        f"- commit: {commit(args.working_tree)}",
        f"- load average (1/5/15 min): {load_before} before, {load()} after",
    ]
    footer = [
        "The bars are issue 17's, set for a machine with a core per process (the pipeline bars) and for the 8B",
        "shape (memory, long prompts); a row says which model it used. A bar marked \"needs a core per process\"",
        "was measured with more processes than CPUs, which share them: its figure is this machine's, not a test",
        "of the bar.",
        "",
        "How each was run (load average 1/5/15 min before → after):",
        "",
        *runs,
    ]
    args.out.write_text(render(rows, header, cpus, footer))
    print(args.out.read_text())


if __name__ == "__main__":
    main()

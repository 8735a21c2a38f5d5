"""Side-by-side benchmark of MCP servers answering the same `tools/call` of `add`, in one run.

    uv run bench/run.py                  # everything below but the soak (about 20 minutes)
    uv run bench/run.py --quick          # tiny counts: a smoke run that checks the harness
    uv run bench/run.py --parts throughput --only "SDK tuned,ours auth"   # a part, some contenders
    uv run bench/run.py --soak 10        # the reliability soak: 64 signed-in clients for 10 minutes

Parts:
- throughput: each contender is its own process on loopback pinned to CPU 0; Debian's `wrk` (16 keep-alive
  connections, bench/add.lua giving every request its own JSON-RPC id) is pinned to CPU 1. In each round
  the contenders of a mode run back to back, so drift in the machine hits them all alike; tables per mode
  and era show medians, the server's CPU time per request (from /proc), the generator's CPU use (over 90%
  of a core means wrk, not the server, set the pace: the run says so), and ratios to A (raw Starlette's
  JSON answer) and to the bare SDK under its defaults and tuned in the same mode, each with its lowest and
  highest round; then the issue's targets, and the run's noise floor: "SDK tuned again", the same server
  in a second process, over "SDK tuned".
- memory (bench/memory.py): RSS per idle stateful session and per open GET stream at 1,000 and 10,000,
  ours against the bare SDK, and three waves of 2,000 sessions to see memory returned or reused.
- rates (bench/rates.py): complete sign-ins per second through the Google stand-in, token refreshes per
  second, and bearer-token validations per second, on SQLite and on Redis: one server, Sentinel and Cluster
  (these two also without waiting for a replica after each write, to show what that WAIT costs).
Figures are only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx2

from bench import memory, rates, soak
from bench.harness import (
    BENCH,
    ERAS,
    LOAD_CPU,
    MODES,
    Contender,
    chosen_contenders,
    is_fastmcp,
    open_session,
    pinned,
    process_cpu_s,
    running,
    server_pid,
)

BASES = ("A raw Starlette", "SDK defaults", "SDK tuned")


@dataclass
class Sample:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float
    generator_cpu: float
    failures: int


def load(url: str, era: str, token: str, seconds: float, connections: int, session: str = "") -> Sample:
    env = {**os.environ, "BENCH_ERA": era, "BENCH_TOKEN": token, "BENCH_SESSION": session}
    command = pinned(LOAD_CPU, ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
                                "-s", str(BENCH / "add.lua"), url])
    before = os.times()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    after = os.times()
    out = done.stdout
    generator = after.children_user + after.children_system - before.children_user - before.children_system
    return Sample(requests_per_s=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
                  p50_ms=latency_ms(out, "50%"), p99_ms=latency_ms(out, "99%"), cpu_us_per_request=0.0,
                  generator_cpu=generator / seconds,
                  failures=int(re.search(r"bench-failures (\d+)", out).group(1)))


def latency_ms(wrk_output: str, percentile: str) -> float:
    value, unit = re.search(rf"^\s+{percentile}\s+([\d.]+)(us|ms|s)\s*$", wrk_output, re.MULTILINE).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def measure(process: subprocess.Popen[bytes], url: str, contender: Contender, era: str, seconds: float,
            connections: int, session: str) -> Sample:
    pid = server_pid(process)
    cpu_before = process_cpu_s(pid)
    sample = load(url, era, contender.token, seconds, connections, session)
    cpu = process_cpu_s(pid) - cpu_before
    sample.cpu_us_per_request = cpu / max(1.0, sample.requests_per_s * seconds) * 1e6
    return sample


def throughput(chosen: list[Contender], workdir: Path, modes: list[str], eras: list[str], rounds: int,
               seconds: float, connections: int, *, judge: bool = True) -> tuple[list[dict], list[dict]]:
    samples: dict[tuple[str, str, str], list[Sample]] = {}
    for round_number in range(rounds):
        # Within a round, the contenders of one mode run back to back: the figures a ratio pairs are seconds
        # apart, so what drifts on the machine over minutes hits both alike.
        for mode in modes:
            for contender in chosen:
                if not any(contender.serves(mode, era) for era in eras):
                    continue
                with running(contender, workdir, mode) as (process, url):
                    session = ""
                    if mode == "stateful":
                        with httpx2.Client() as client:
                            session = open_session(client, url, contender.token)
                    for era in eras:
                        if not contender.serves(mode, era):
                            continue
                        load(url, era, contender.token, min(1.0, seconds), connections, session)  # warm up
                        sample = measure(process, url, contender, era, seconds, connections, session)
                        samples.setdefault((contender.name, mode, era), []).append(sample)
            print(f"round {round_number + 1}/{rounds}: {MODES[mode]} done", file=sys.stderr)
    rows = report(chosen, modes, eras, samples)
    if not judge:
        print("\ntargets: not judged in a --quick run (one round of one second measures the harness, not the "
              "servers); run without --quick to judge them")
        return rows, []
    return rows, targets(rows)


def median(samples: list[Sample], attribute: str) -> float:
    return statistics.median(getattr(sample, attribute) for sample in samples)


def paired(top: list[float], bottom: list[float]) -> tuple[float, float, float]:
    """A ratio of two contenders as the median of their medians, with its range across rounds: round i's
    figure over the other's in round i (the two ran minutes apart at most, so drift hits both alike)."""
    per_round = [a / max(b, 1e-9) for a, b in zip(top, bottom, strict=False)]
    return statistics.median(top) / max(statistics.median(bottom), 1e-9), min(per_round), max(per_round)


def spread(ratio: tuple[float, float, float]) -> str:
    figure, low, high = ratio
    return f"{figure:.2f} ({low:.2f}-{high:.2f})" if figure == figure else "nan"


def report(chosen: list[Contender], modes: list[str], eras: list[str],
           samples: dict[tuple[str, str, str], list[Sample]]) -> list[dict]:
    rows = []
    for mode in modes:
        for era in eras:
            here = [c for c in chosen if (c.name, mode, era) in samples]
            if not here:
                continue
            base = {name: [sample.requests_per_s for sample in samples[key]] for name in BASES
                    if (key := (name, "json" if name.startswith("A ") else mode, era)) in samples}
            rounds = len(samples[(here[0].name, mode, era)])
            print(f"\n{MODES[mode]}, era {era}: tools/call add, {rounds} round(s); each ratio with its lowest and "
                  "highest round")
            print(f"{'contender':<22}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU µs/req':>12}{'wrk CPU':>9}"
                  f"{'xA':>21}{'xSDK defaults':>21}{'xSDK tuned':>21}")
            for contender in here:
                got = samples[(contender.name, mode, era)]
                rps = median(got, "requests_per_s")
                per_round = [sample.requests_per_s for sample in got]
                nan = (float("nan"),) * 3
                ratios = [paired(per_round, base[name]) if name in base else nan for name in BASES]
                generator = median(got, "generator_cpu")
                row = {"contender": contender.name, "mode": mode, "era": era, "requests_per_s": rps,
                       "p50_ms": median(got, "p50_ms"), "p99_ms": median(got, "p99_ms"),
                       "cpu_us_per_request": median(got, "cpu_us_per_request"), "generator_cpu": generator,
                       "ratio_a": ratios[0][0], "ratio_sdk_defaults": ratios[1][0], "ratio_sdk_tuned": ratios[2][0],
                       "ratio_sdk_tuned_range": ratios[2][1:], "rounds_requests_per_s": per_round,
                       "rounds_p99_ms": [sample.p99_ms for sample in got],
                       "failures": sum(sample.failures for sample in got)}
                rows.append(row)
                flag = "  (generator-bound)" if generator > 0.9 else ""
                failed = f"  FAILURES {row['failures']}" if row["failures"] else ""
                print(f"{contender.name:<22}{rps:>9.0f}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}"
                      f"{row['cpu_us_per_request']:>12.0f}{generator:>8.0%} {spread(ratios[0]):>20}"
                      f"{spread(ratios[1]):>21}{spread(ratios[2]):>21}{flag}{failed}")
    if any(c.name == "TS SDK" for c in chosen) and "2026-07-28" in eras:
        print("\n(the TypeScript SDK 1.32 answers 2026-07-28 requests with 400 'Unsupported protocol version':"
              " it is measured in the handshake era only, and 2026-07-28 figures are compared with that one)")
    return rows


@dataclass
class Target:
    """One of the issue's targets: `figure` (ours over theirs, in the same run) against `goal`."""

    name: str
    figure: float
    goal: float
    at_most: bool = False  # the figure must not exceed the goal (latency), rather than reach it
    low: float = float("nan")  # the figure's lowest and highest round
    high: float = float("nan")

    @property
    def met(self) -> bool:
        return self.figure <= self.goal if self.at_most else self.figure >= self.goal

    @property
    def within_noise(self) -> bool:
        """The goal lies between the lowest and highest round: this run cannot tell a miss from noise."""
        return self.low <= self.goal <= self.high

    def line(self) -> str:
        noise = "  (the goal is within the rounds' range)" if self.within_noise else ""
        return f"{'met ' if self.met else 'MISS'}  {self.name} {'≤' if self.at_most else '≥'} {self.goal:.2f}: " \
               f"{self.figure:.2f}, rounds {self.low:.2f}-{self.high:.2f}{noise}"


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets that this run can judge, each a ratio within the run, printed as the figure
    compared with its goal."""
    by = {(row["contender"], row["mode"], row["era"]): row for row in rows}
    checks: list[Target] = []

    def ratio(name: str, top: tuple[str, str, str], bottom: tuple[str, str, str], goal: float,
              attribute: str = "requests_per_s", at_most: bool = False) -> None:
        if top in by and bottom in by:
            rounds = "rounds_p99_ms" if attribute == "p99_ms" else "rounds_requests_per_s"
            figure, low, high = paired(by[top][rounds], by[bottom][rounds])
            checks.append(Target(name, figure, goal, at_most, low, high))

    fastmcp = next((name for name, _, _ in by if is_fastmcp(name)), None)
    for era in ERAS:
        for mode, label in MODES.items():
            on, tuned = ("ours auth on SQLite", mode, era), ("SDK tuned", mode, era)
            ratio(f"{era}, {label}: auth on SQLite / SDK tuned", on, tuned, 1.0 if mode == "json" else 0.95)
            ratio(f"{era}, {label}: auth on / auth off", on, ("ours auth off", mode, era), 0.95)
            ratio(f"{era}, {label}: auth on Redis / SQLite", ("ours auth on Redis", mode, era), on, 0.95)
            ratio(f"{era}, {label}: p99 of auth on SQLite / SDK tuned's", on, tuned, 1.1, "p99_ms", at_most=True)
        on = ("ours auth on SQLite", "json", era)
        if fastmcp:
            ratio(f"{era}: auth on SQLite / {fastmcp}", on, (fastmcp, "json", era), 2.0)
        ratio(f"{era}: auth on SQLite / TS SDK (its 2025-11-25 figure)", on, ("TS SDK", "json", "legacy"),
              1.0 if era == "legacy" else 2.0)
        ratio(f"{era}: metrics on / metrics off", ("ours metrics on", "json", era), on, 0.97)
        for baseline in sorted({name for name, _, _ in by if name.startswith("ours @")}):
            ratio(f"{era}: auth on SQLite / {baseline.removesuffix(' auth on')}", on, (baseline, "json", era), 0.97)
    if checks:
        print("\ntargets: the figure after each is the one compared with the goal")
    for check in checks:
        print(check.line())
    floors = [(era, label, paired(by[again]["rounds_requests_per_s"], by[tuned]["rounds_requests_per_s"]))
              for era in ERAS for mode, label in MODES.items()
              if (again := ("SDK tuned again", mode, era)) in by and (tuned := ("SDK tuned", mode, era)) in by]
    if floors:
        print("\nnoise floor: the same server in two processes (SDK tuned again / SDK tuned), in each mode; a "
              "ratio's range as wide as this one's is noise")
    for era, label, ratio in floors:
        print(f"      {era}, {label}: {spread(ratio)}")
    return [{"target": c.name, "value": c.figure, "lowest_round": c.low, "highest_round": c.high, "goal": c.goal,
             "at_most": c.at_most, "met": c.met, "within_noise": c.within_noise} for c in checks]


def draw_chart(rows: list[dict], path: Path) -> None:
    """Requests per second and CPU per request of every contender, one panel pair per mode and era."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((row["mode"], row["era"]) for row in rows))
    contenders = list(dict.fromkeys(row["contender"] for row in rows))
    colours = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(contenders)}
    figure, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 0.42 * len(contenders) * 2 + 2),
                                squeeze=False, constrained_layout=True)
    for column, (mode, era) in enumerate(groups):
        here = [row for row in rows if (row["mode"], row["era"]) == (mode, era)]
        names = [row["contender"] for row in here]
        for line, (attribute, label) in enumerate((("requests_per_s", "requests per second (more is better)"),
                                                   ("cpu_us_per_request", "CPU µs per request (less is better)"))):
            axis = axes[line][column]
            values = [row[attribute] for row in here]
            bars = axis.barh(names, values, color=[colours[name] for name in names])
            axis.bar_label(bars, fmt="%.0f", padding=2, fontsize=8)
            axis.invert_yaxis()
            axis.set_xlabel(label, fontsize=9)
            axis.tick_params(labelsize=8)
            axis.margins(x=0.18)
            if line == 0:
                axis.set_title(f"{MODES[mode]}, {era if era != 'legacy' else '2025-11-25'}", fontsize=10)
    figure.suptitle("tools/call add, 16 connections, one run: ratios are only comparable within it", fontsize=10)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"\nchart: {path}")


# --- the run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="throughput,memory,rates", help="comma-separated parts to run")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one throughput measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--eras", default=",".join(ERAS))
    parser.add_argument("--modes", default=",".join(MODES), help=f"throughput modes: {', '.join(MODES)}")
    parser.add_argument("--only", default="", help="comma-separated name prefixes of contenders to run")
    parser.add_argument("--baseline", metavar="REVISION", help="also run server.py as it was at this git revision")
    parser.add_argument("--quick", action="store_true", help="one round of one second, tiny counts elsewhere")
    parser.add_argument("--soak", type=float, metavar="MINUTES", help="run only the soak, this long")
    parser.add_argument("--soak-clients", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--chart", type=Path, help="draw the throughput table into this PNG (matplotlib)")
    args = parser.parse_args(argv)
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    if shutil.which("wrk") is None:
        print("bench: Debian's wrk is needed (apt-get install wrk)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="stream-http-bench-"))
    if args.soak is not None:
        result = soak.run(workdir, minutes=args.soak, clients=args.soak_clients)
        write(args.json, {"soak": result})
        return 0 if result["failed"] == 0 else 1
    if args.quick:
        args.seconds, args.rounds = 1.0, 1
    parts = [part for part in args.parts.split(",") if part]
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    results: dict[str, object] = {}
    failed = False
    if "throughput" in parts:
        chosen, stack = chosen_contenders(workdir, only, args.baseline, throughput=True)
        with stack:
            rows, judged = throughput(chosen, workdir, [m for m in args.modes.split(",") if m],
                                      [e for e in args.eras.split(",") if e], args.rounds, args.seconds,
                                      args.connections, judge=not args.quick)
        results["throughput"], results["targets"] = rows, judged
        if args.chart is not None:
            draw_chart(rows, args.chart)
        failed |= any(row["failures"] for row in rows)
    if "memory" in parts:
        found = memory.run(workdir, quick=args.quick)
        results["memory"] = [asdict(m) for m in found]
    if "rates" in parts:
        found_rates = rates.run(workdir, quick=args.quick)
        results["rates"] = found_rates
        failed |= any(rate["failed"] for rate in found_rates)
    write(args.json, results)
    return 1 if failed else 0


def write(path: Path | None, results: dict[str, object]) -> None:
    if path is not None:
        path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())

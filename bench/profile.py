"""A py-spy flame graph of one contender under the benchmark's load, and the top of it as text.

    uv run bench/profile.py                                   # ours, sign-in on, SQLite, stateless JSON
    uv run bench/profile.py --contender "SDK tuned" --era legacy --out /tmp/sdk.svg

The contender runs as in bench/run.py (pinned to CPU 0, wrk on CPU 1); py-spy samples it for `--seconds`
while wrk loads it. The SVG is the flame graph; the text printed is the functions with the most samples,
by their own time (where the CPU was) and by their inclusive time (what they called too), each as a share
of every sample. The figures are from one process: compare graphs of the same run length and load.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx2

from bench.harness import ERAS, MODES, chosen_contenders, open_session, running, server_pid
from bench.run import load


def py_spy() -> list[str]:
    """py-spy from PATH, else through uvx (a profiler the project itself never imports)."""
    found = shutil.which("py-spy")
    return [found] if found else ["uvx", "py-spy"]


def spy(pid: int, seconds: float, format_: str, output: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling `pid` without pausing it (two can sample one process at once)."""
    return subprocess.Popen(
        [
            *py_spy(),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(round(seconds)),
            "--rate",
            "200",
            "--nonblocking",
            "--format",
            format_,
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def frame_name(frame: str) -> str:
    """`handle (server.py:4851)` as py-spy folds it, without the line: one entry per function."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    return f"{name} ({Path(path).name})" if path else name


def tops(folded: Path, count: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]], int]:
    """The functions with the most samples of their own, and with the most samples in all (with callees)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        n = int(samples)
        total += n
        frames = [frame_name(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for name in set(frames):
            inclusive[name] += n
    share = max(total, 1)
    return (
        [(name, n / share) for name, n in own.most_common(count)],
        [(name, n / share) for name, n in inclusive.most_common(count)],
        total,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contender", default="ours auth on SQLite")
    parser.add_argument("--mode", default="json", choices=list(MODES))
    parser.add_argument("--era", default="2026-07-28", choices=list(ERAS))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("flame.svg"), help="the flame graph (SVG)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="stream-http-profile-"))
    chosen, stack = chosen_contenders(workdir, [args.contender])
    contender = next((c for c in chosen if c.name == args.contender), None)
    if contender is None:
        print(f"profile: no contender named {args.contender!r}", file=sys.stderr)
        return 2
    folded = args.out.with_suffix(".folded")
    with stack, running(contender, workdir, args.mode) as (process, url):
        session = ""
        if args.mode == "stateful":
            with httpx2.Client() as client:
                session = open_session(client, url, contender.token)
        load(url, args.era, contender.token, 1.0, args.connections, session)  # warm up
        pid = server_pid(process)
        spies = [spy(pid, args.seconds, "raw", folded), spy(pid, args.seconds, "flamegraph", args.out)]
        sample = load(url, args.era, contender.token, args.seconds + 1, args.connections, session)
        for spying in spies:
            _, err = spying.communicate()
            if spying.returncode != 0:
                print(f"profile: py-spy failed: {err.decode()[-500:]}", file=sys.stderr)
                return 1
    own, inclusive, total = tops(folded, args.top)
    print(
        f"{contender.name}, {MODES[args.mode]}, era {args.era}: {sample.requests_per_s:.0f} req/s under py-spy, "
        f"{total} samples; flame graph {args.out}"
    )
    print(f"\n{'own time':>9}  function")
    for name, share in own:
        print(f"{share:>9.1%}  {name}")
    print(f"\n{'inclusive':>9}  function")
    for name, share in inclusive:
        print(f"{share:>9.1%}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

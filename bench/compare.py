"""Compare two source trees of django-clustershm on the benchmarks' headline figures, in one run.

Each round runs every named script (core, cache, locks, listeners, http, async, redis, redis_near, big, gaps: this
checkout's, on the package's public API) once against each tree, before then after, with PYTHONPATH set to the tree, whose package the
run's JSON must name. The table: each headline figure's median and spread over the rounds per tree, after / before,
and "better" or "worse" only where the two trees' ranges do not overlap. cache runs only clustershm and near, locks
and async only clustershm, unless ``--peers``; redis, redis_near, big and gaps run one of their own rounds per round.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

import lab

HERE = os.path.dirname(os.path.abspath(__file__))

SCRIPTS = ("core", "cache", "locks", "listeners", "http", "async", "redis", "redis_near", "big", "gaps")
FOCUS = {"cache": ["--only", "clustershm,near"], "locks": ["--only", "clustershm"], "async": ["--only", "clustershm"],
         "redis": ["--rounds", "1"], "redis_near": ["--rounds", "1"], "big": ["--rounds", "1"],
         "gaps": ["--rounds", "1"]}  # fmt: skip
# redis, redis_near, big and gaps: one of their rounds per compare.py round (with their peers: the ratios)


def run_script(script: str, tree: str, options: list[str], out: str, timeout: float) -> tuple[dict | None, str]:
    """One run of bench_SCRIPT.py against ``tree``: its headline figures (None if it gave none), and what went wrong."""
    argv = [sys.executable, os.path.join(HERE, f"bench_{script}.py"), "--json", out + ".json", *options]
    env = {**os.environ, "PYTHONPATH": tree}
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:g}s"
    with open(out + ".md", "w") as fh:
        fh.write(done.stdout + "\n<!-- stderr:\n" + done.stderr + "\n-->\n")
    if not os.path.exists(out + ".json"):
        return None, f"exit status {done.returncode}, no JSON; stderr ends:\n{done.stderr[-2000:]}"
    with open(out + ".json") as fh:
        report = json.load(fh)
    package = os.path.realpath(report["package"])
    if package != os.path.realpath(os.path.join(tree, "django_clustershm")):
        raise lab.BenchError(f"bench_{script}.py imported {package}, not the package of {tree}")
    return report["headline"], f"exit status {done.returncode} (problems in its report)" if done.returncode else ""


def compare(values: dict, better: dict) -> tuple[list[list], dict]:
    """The table's rows and the JSON summary of every figure's rounds."""
    rows, summary = [], {}
    for name, direction in better.items():
        b, a = (lab.rounds(values[side][name]) if values[side].get(name) else None for side in ("before", "after"))
        r = lab.ratio(a and a["median"], b and b["median"])
        change = "n/a"
        if r is not None and min(len(b["values"]), len(a["values"])) < 2:
            change = "n/a (one round: no spread)"
        elif r is not None:
            up = r > 1 if direction == "higher" else r < 1
            apart = a["max"] < b["min"] or a["min"] > b["max"]
            change = ("better" if up else "worse") if apart else "ranges overlap"
        cells = [[lab.fmt(s and s["median"], 2), "-" if not s or s["spread"] is None else f"{s['spread']:.0%}"]
                 for s in (b, a)]  # fmt: skip
        rows.append([f"{name} ({direction} is better)", *cells[0], *cells[1],
                     "n/a" if r is None else f"{r:.3f}", change])  # fmt: skip
        summary[name] = {"better": direction, "before": b, "after": a, "after_over_before": r, "change": change}
    return rows, summary


def main(argv=None) -> int:
    p = lab.parser(__doc__, quick="pass --quick to every script (a smoke run)")
    p.add_argument("scripts", nargs="+", choices=SCRIPTS, help="the benchmarks to run, by name")
    p.add_argument("--before", required=True, metavar="TREE", help="the older source tree (a checkout)")
    p.add_argument("--after", required=True, metavar="TREE", help="the newer source tree (a checkout)")
    p.add_argument("--rounds", type=lab.count, default=3, help="runs of each script per tree (default 3)")
    p.add_argument("--peers", action="store_true", help="run every peer in cache, locks and async, not only clustershm")
    p.add_argument("--args", action="append", default=[], metavar="NAME=OPTIONS", help="more options for one script")
    p.add_argument("--timeout", type=lab.seconds, default=1800.0, help="seconds one run may take (default 1800)")
    p.add_argument("--keep", metavar="DIR", help="keep every run's report (Markdown and JSON) in DIR")
    args = p.parse_args(argv)
    trees = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    for side, tree in trees.items():
        if not os.path.isfile(os.path.join(tree, "django_clustershm", "__init__.py")):
            p.error(f"--{side} {tree}: no django_clustershm/__init__.py there")
    options = {name: (["--quick"] if args.quick else []) + ([] if args.peers else FOCUS.get(name, []))
               for name in args.scripts}  # fmt: skip
    for extra in args.args:
        name, _, text = extra.partition("=")
        if name not in options:
            p.error(f"--args {extra!r}: {name!r} is not one of the scripts to run")
        options[name] += shlex.split(text)

    values: dict = {"before": {}, "after": {}}
    better: dict = {}
    failures: list[str] = []
    keep = args.keep or tempfile.mkdtemp(prefix="clustershm-compare-")
    os.makedirs(keep, exist_ok=True)
    try:
        for r in range(1, args.rounds + 1):
            for script in args.scripts:
                for side, tree in trees.items():
                    lab.log(f"round {r}/{args.rounds}: bench_{script}.py on {side} ({tree})")
                    out = os.path.join(keep, f"{script}-{side}-{r}")
                    headline, problem = run_script(script, tree, options[script], out, args.timeout)
                    if problem:
                        failures.append(f"round {r}, bench_{script}.py on {side}: {problem}")
                        lab.log(f"  {failures[-1]}")
                    for name, figure in (headline or {}).items():
                        better.setdefault(name, figure["better"])
                        if figure["value"] is not None:
                            values[side].setdefault(name, []).append(figure["value"])
    finally:
        if not args.keep:
            shutil.rmtree(keep, ignore_errors=True)

    rows, summary = compare(values, better)
    print(f"django-clustershm: {', '.join(args.scripts)}; {args.rounds} round(s) per tree, interleaved"
          f"{' (--quick: smoke figures)' if args.quick else ''}\n\nbefore: {trees['before']}\nafter:  {trees['after']}\n")  # fmt: skip
    print(lab.table(["figure", "before: median", "before: spread", "after: median", "after: spread",
                     "after / before", "change"], rows, align="lrrrrrl"))  # fmt: skip
    if failures:
        print("\nRuns with problems:\n" + "\n".join(f"- {f}" for f in failures))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"trees": trees, "scripts": args.scripts, "rounds": args.rounds, "quick": args.quick,
                       "options": options, "figures": summary, "values": values, "failures": failures}, fh, indent=2)  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    lab.run(main)

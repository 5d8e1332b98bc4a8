"""Benchmark driver, run INSIDE a throw-away host netns (bench/run.py puts it there).

It times whole plugin executions the way a runtime makes them (fork+exec, env, stdin, stdout),
for one plugin variant at a time, and prints one JSON object of raw timings.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import time
from typing import Any


def call(
    binary: str, command: str, conf: dict[str, Any], cid: str, netns: str, env: dict[str, str]
) -> tuple[float, int, Any]:
    variables = {
        **env,
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
    }
    started = time.perf_counter()
    proc = subprocess.run(
        [binary], input=json.dumps(conf).encode(), env=variables, capture_output=True, check=False
    )
    elapsed = (time.perf_counter() - started) * 1000
    out = json.loads(proc.stdout) if proc.stdout.strip() else None
    return elapsed, proc.returncode, out


def burst(
    pool: concurrent.futures.Executor, size: int, binary: str, verb: str, conf: dict[str, Any], tag: str,
    pods: list[str], env: dict[str, str],
) -> tuple[float, list[tuple[float, int, Any]]]:
    """`size` calls at once, pod i as container `tag`-i: (wall ms, each call's result)."""
    started = time.perf_counter()
    results = list(pool.map(lambda i: call(binary, verb, conf, f"{tag}-{i}", pods[i], env), range(size)))
    return (time.perf_counter() - started) * 1000, results


def variables(raw: str) -> dict[str, str]:
    """The calls' environment: PATH and the variant's own variables (a JSON object)."""
    return {"PATH": os.environ["PATH"], **json.loads(raw)}


def non_bridges() -> int:
    """Links of the host netns other than bridges (a burst's first ADD may make its bridge)."""
    names = os.listdir("/sys/class/net")
    return sum(1 for name in names if not os.path.isdir(f"/sys/class/net/{name}/bridge"))


def settle(links: int, timeout: float = 10.0) -> None:
    """Wait until the host netns is back to `links` non-bridge links: pybridge's agent deletes
    veths after answering DEL, and the next burst, of either variant, must not pay for that."""
    deadline = time.monotonic() + timeout
    while non_bridges() > links and time.monotonic() < deadline:
        time.sleep(0.01)


def churn_round(
    pool: concurrent.futures.Executor, size: int, adds: int, binary: str, conf: dict[str, Any], tag: str,
    pods: list[str], env: dict[str, str],
) -> tuple[list[float], int, float, list[tuple[float, int, Any]]]:
    """`size` pods made (untimed), then all of them deleted at once while `adds` ADDs for other
    pods are timed one after another: what a pod start costs while others are torn down (their
    veths still being removed, by the plugin or, for pybridge, by its agent after answering).
    Returns the ADDs' ms, how many began with some deletion still pending (a deleted pod's host
    veth still there), the DEL burst's wall ms and every call's result."""
    links = non_bridges()
    _, made = burst(pool, size, binary, "ADD", conf, tag, pods, env)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as runner:
        dels = runner.submit(burst, pool, size, binary, "DEL", conf, tag, pods, env)
        timed, pending, results = [], 0, list(made)
        for j in range(adds):
            pending += non_bridges() - links - j > 0
            result = call(binary, "ADD", conf, f"{tag}-t{j}", pods[size + j], env)
            timed.append(result[0])
            results.append(result)
        del_wall, deleted = dels.result()
    results += deleted
    settle(links + adds)
    results += [call(binary, "DEL", conf, f"{tag}-t{j}", pods[size + j], env) for j in range(adds)]
    settle(links)
    return timed, pending, del_wall, results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--conf", required=True)
    parser.add_argument("--pods", required=True, help="file with one netns path per line")
    parser.add_argument("--sequential", type=int, required=True)
    parser.add_argument("--parallel", type=int, required=True)
    parser.add_argument("--scale", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1, help="parallel bursts; the median is reported")
    parser.add_argument("--env", default="{}")
    parser.add_argument("--churn", type=int, default=0, help="pods deleted at once in each churn round")
    parser.add_argument("--churn-adds", type=int, default=8, help="ADDs timed during each churn round")
    parser.add_argument("--churn-rounds", type=int, default=5)
    # A second variant whose sequential calls and parallel bursts alternate with this one's.
    parser.add_argument("--pair-binary")
    parser.add_argument("--pair-conf")
    parser.add_argument("--pair-env", default="{}")
    args = parser.parse_args()
    with open(args.conf) as f:
        conf = json.load(f)
    with open(args.pods) as f:
        pods = f.read().split()
    env = variables(args.env)
    report: dict[str, Any] = {"errors": []}

    def record(kind: str, result: tuple[float, int, Any]) -> Any:
        elapsed, rc, out = result
        report[kind].append(elapsed)
        if rc != 0:
            report["errors"].append({"verb": kind, "out": out})
        return out

    # With a pair, each step makes one call sequence or burst of each variant, in turn first:
    # the machine's speed drifts over minutes, so ratios of figures made side by side are the
    # steadier ones.
    variants = [("", args.binary, conf, env)]
    if args.pair_binary and args.pair_conf:
        with open(args.pair_conf) as f:
            variants.append(("pair_", args.pair_binary, json.load(f), variables(args.pair_env)))
    for key, *_ in variants:
        report.update({f"{key}add": [], f"{key}check": [], f"{key}del": []})

    links = non_bridges()
    for i in range(args.sequential):
        for key, binary, vconf, venv in variants if i % 2 == 0 else variants[::-1]:
            cid = f"{key}seq-{i}"
            result = record(f"{key}add", call(binary, "ADD", vconf, cid, pods[i], venv))
            if result and vconf["cniVersion"] >= "0.4.0":
                checked = {**vconf, "prevResult": result}
                record(f"{key}check", call(binary, "CHECK", checked, cid, pods[i], venv))
            record(f"{key}del", call(binary, "DEL", vconf, cid, pods[i], venv))
            if len(variants) > 1:
                settle(links)  # neither variant's calls pay for the other's deferred deletions

    # Concurrency: N ADDs at once, then N DELs at once; `rounds` such bursts, as one burst's wall
    # time swings by a third between runs on a small VM.
    walls: dict[str, tuple[list[float], list[float]]] = {key: ([], []) for key, *_ in variants}
    errors: dict[str, int] = {key: 0 for key, *_ in variants}
    distinct: list[int] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(args.parallel, 1)) as pool:
        for r in range(args.rounds if args.parallel else 0):
            for key, binary, vconf, venv in variants if r % 2 == 0 else variants[::-1]:
                links = non_bridges()
                add_wall, adds = burst(pool, args.parallel, binary, "ADD", vconf, f"{key}par-{r}", pods, venv)
                del_wall, dels = burst(pool, args.parallel, binary, "DEL", vconf, f"{key}par-{r}", pods, venv)
                walls[key][0].append(add_wall)
                walls[key][1].append(del_wall)
                settle(links)
                errors[key] += sum(1 for result in adds + dels if result[1] != 0)
                distinct.append(len({a[2]["ips"][0]["address"] for a in adds if a[1] == 0 and a[2]}))
    for key, (add_walls, del_walls) in walls.items():
        report[f"{key}par_add_walls"], report[f"{key}par_del_walls"] = add_walls, del_walls
        report[f"{key}par_add_wall"] = sorted(add_walls)[len(add_walls) // 2] if add_walls else None
        report[f"{key}par_del_wall"] = sorted(del_walls)[len(del_walls) // 2] if del_walls else None
        report[f"{key}par_errors"] = errors[key]
    report["par_distinct_ips"] = min(distinct, default=None)  # per burst: each ADD got its own IP

    # Churn: ADDs while other pods are deleted, the variants' rounds alternating.
    for key, *_ in variants:
        report.update({f"{key}churn_add": [], f"{key}churn_pending": 0, f"{key}churn_del_walls": []})
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(args.churn, 1)) as pool:
        for r in range(args.churn_rounds if args.churn else 0):
            for key, binary, vconf, venv in variants if r % 2 == 0 else variants[::-1]:
                timed, pending, del_wall, results = churn_round(
                    pool, args.churn, args.churn_adds, binary, vconf, f"{key}churn-{r}", pods, venv)
                report[f"{key}churn_add"] += timed
                report[f"{key}churn_pending"] += pending
                report[f"{key}churn_del_walls"].append(del_wall)
                report["errors"] += [{"verb": f"{key}churn", "out": out} for _, rc, out in results if rc != 0]

    # Scale: ADD latency as the bridge fills up to `scale` pods.
    scale_add = []
    for i in range(args.scale):
        elapsed, rc, out = call(args.binary, "ADD", conf, f"scale-{i}", pods[i], env)
        scale_add.append(elapsed)
        if rc != 0:
            report["errors"].append({"verb": "scale-add", "out": out})
    report["scale_add"] = scale_add
    for i in range(args.scale):
        elapsed, rc, out = call(args.binary, "DEL", conf, f"scale-{i}", pods[i], env)
        if rc != 0:
            report["errors"].append({"verb": "scale-del", "out": out})
    # Start-up: VERSION, which does no work, through the same exec path.
    startup = []
    for _ in range(20):
        started = time.perf_counter()
        subprocess.run(
            [args.binary], input=b"{}", env={**env, "CNI_COMMAND": "VERSION"}, capture_output=True, check=True
        )
        startup.append((time.perf_counter() - started) * 1000)
    report["startup"] = sorted(startup)[len(startup) // 2]
    print(json.dumps(report))


if __name__ == "__main__":
    main()

"""`make bench`: the reference bridge+host-local against pybridge, side by side in one run.

The reference plugins run twice: Debian 12's (1.1.1, the ratios' base) and, when Debian's
unstable archive can be reached or is cached (scripts/sid.py), today's (1.9.1); the version is in
the column's name. Everything happens in a throw-away host netns with pre-made pod netns (their
creation is not timed). Prints a table of each figure with its ratio to the reference 1.1.1 and,
with --write, writes it with the machine's description to bench/results.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cni_plugin import placement
from cni_plugin.install import build_client, import_paths, install

HERE = Path(__file__).resolve().parent
REFERENCE = "/usr/lib/cni"
PREFIX = "pbt-bench"
NETPOL_SECTION = "## NetworkPolicy at 500 pods"  # bench/results.md's part that `make bench-netpol` fills
CHURN_ADDS = 8  # ADDs timed in each churn round (bench/driver.py's default)


def progress(step: str) -> None:
    """One line per step on stderr as the run goes (it takes minutes); stdout keeps the table."""
    print(f"bench: {time.strftime('%H:%M:%S')} {step}", file=sys.stderr, flush=True)


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, capture_output=True, check=check)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def conf(kind: str, ipam: str, bridge: str, subnet: str, data_dir: str) -> dict[str, Any]:
    # Debian's reference plugins speak up to 1.0.0: every variant uses it, for a fair run.
    return {
        "cniVersion": "1.0.0",
        "name": f"bench-{bridge}",
        "type": kind,
        "bridge": bridge,
        "isGateway": True,
        "isDefaultGateway": True,
        "ipam": {"type": ipam, "dataDir": data_dir, "ranges": [[{"subnet": subnet}]]},
    }


class World:
    """The host netns and the pod netns; removed on exit, also on failure."""

    def __init__(self, pods: int) -> None:
        self.tag = secrets.token_hex(3)
        self.host = f"{PREFIX}-{self.tag}-h"
        self.pods = [f"{PREFIX}-{self.tag}-{i}" for i in range(pods)]

    def __enter__(self) -> World:
        sh("ip", "netns", "add", self.host)
        sh("ip", "netns", "exec", self.host, "ip", "link", "set", "lo", "up")
        for pod in self.pods:
            sh("ip", "netns", "add", pod)
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in [*self.pods, self.host]:
            sh("ip", "netns", "del", ns, check=False)


def netns_in_kernel() -> int | None:
    """Network namespaces the kernel still holds (its slab's active objects, a coarse count),
    None where /proc/slabinfo does not tell."""
    try:
        with open("/proc/slabinfo") as slabs:
            for line in slabs:
                if line.startswith("net_namespace "):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def wait_for_netns_cleanup(timeout: float = 120.0) -> float:
    """Wait until the kernel has freed the namespaces a World deleted: it tears them down in the
    background, rtnl_lock held for much of it, which slowed whatever was timed next. Done when
    the count stops falling for a second; returns the seconds waited."""
    started = time.monotonic()
    last, steady_since = netns_in_kernel(), started
    while last is not None and time.monotonic() - started < timeout:
        time.sleep(0.2)
        now = netns_in_kernel()
        if now is None or now < last:
            steady_since = time.monotonic()
        elif time.monotonic() - steady_since >= 1.0:
            break
        last = now
    return time.monotonic() - started


def drive(
    world: World,
    tmp: Path,
    binary: str,
    config: dict[str, Any],
    env: dict[str, str],
    sequential: int,
    parallel: int,
    scale: int,
    rounds: int,
    pair: tuple[str, dict[str, Any], dict[str, str]] | None = None,
    churn: tuple[int, int] = (0, 0),
) -> dict[str, Any]:
    conf_file = tmp / f"{config['bridge']}.json"
    conf_file.write_text(json.dumps(config))
    pair_args: list[str] = []
    if pair is not None:
        pair_conf = tmp / f"{pair[1]['bridge']}.json"
        pair_conf.write_text(json.dumps(pair[1]))
        pair_args = ["--pair-binary", pair[0], "--pair-conf", str(pair_conf),
                     "--pair-env", json.dumps(pair[2])]
    pods_file = tmp / "pods.txt"
    pods_file.write_text("\n".join(f"/run/netns/{p}" for p in world.pods))
    proc = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            world.host,
            sys.executable,
            str(HERE / "driver.py"),
            "--binary",
            binary,
            "--conf",
            str(conf_file),
            "--pods",
            str(pods_file),
            "--sequential",
            str(sequential),
            "--parallel",
            str(parallel),
            "--scale",
            str(scale),
            "--rounds",
            str(rounds),
            "--env",
            json.dumps(env),
            "--churn",
            str(churn[0]),
            "--churn-rounds",
            str(churn[1]),
            *pair_args,
        ],
        capture_output=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def shim_imports() -> tuple[float, list[str]]:
    """The exec path's own imports (-X importtime): total ms of the top-level imports, and the
    project's modules among them."""
    code = f"import sys; sys.path[:0] = {import_paths()!r}; import cni_plugin.shim"
    proc = subprocess.run(
        [sys.executable, "-IS", "-X", "importtime", "-c", code], capture_output=True, text=True, check=True
    )
    modules, total = [], 0
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self, cumulative, name = (part.strip() for part in line[len("import time:") :].split("|"))
        modules.append(name)
        if not line.split("|")[2].startswith("  "):
            total += int(cumulative)
    return total / 1000, [m for m in modules if m.startswith("cni_plugin")]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


Variant = tuple[str, str, str, str, dict[str, str]]  # label, binary, type, IPAM type, env
AGENT = "pybridge+agent"
REFERENCES = ("reference", "reference sid")  # Debian 12's (the ratios' base) and sid's


def _sid() -> Any:
    """scripts/sid.py (the repo's root on the path as for bench/cri.py)."""
    if str(HERE.parent) not in sys.path:
        sys.path.insert(1, str(HERE.parent))
    from scripts import sid

    return sid


def sid_reference() -> tuple[str, str]:
    """sid's reference plugins (scripts/sid.py): (their version, their directory), or the version
    empty and the reason why they are not there."""
    sid = _sid()
    try:
        plugins = sid.reference_plugins()
    except sid.Unavailable as exc:
        return "", f"reference plugins from Debian's {sid.SUITE}: {exc}"
    return sid.plugins_version(plugins), str(plugins)


def reference_version() -> str:
    """Debian 12's containernetworking-plugins version (`1.1.1`)."""
    return str(_sid().plugins_version(Path(REFERENCE)))


def variants(args: argparse.Namespace, tmp: Path) -> list[Variant]:
    bin_dir = tmp / "bin"
    install(str(bin_dir), str(tmp / "libexec"))
    socket = tmp / "agent" / "agent.sock"
    plan: list[Variant] = [
        ("reference", f"{REFERENCE}/bridge", "bridge", "host-local", {"CNI_PATH": REFERENCE}),
    ]
    if args.sid_reference:
        plan.append(("reference sid", f"{args.sid_reference}/bridge", "bridge", "host-local",
                     {"CNI_PATH": args.sid_reference}))
    plan += [
        (
            AGENT,
            str(bin_dir / "pybridge"),
            "pybridge",
            "pyipam",
            {"CNI_PATH": f"{bin_dir}:{REFERENCE}", "PYBRIDGE_AGENT_SOCKET": str(socket)},
        ),
        (
            "pybridge in-process",
            str(bin_dir / "pybridge"),
            "pybridge",
            "pyipam",
            {"CNI_PATH": f"{bin_dir}:{REFERENCE}", "PYBRIDGE_AGENT_SOCKET": str(tmp / "none.sock")},
        ),
    ]
    if args.bundle:
        # As on a kind node with no agent answering: the compiled client falls back to the bundle.
        kind_bin = tmp / "kind-bin"
        kind_bin.mkdir()
        build_client(str(kind_bin / "pybridge"), str(Path(args.bundle).resolve().parent))
        plan.append(
            (
                "kind bundle (no agent)",
                str(kind_bin / "pybridge"),
                "pybridge",
                "pyipam",
                {"CNI_PATH": str(kind_bin), "PYBRIDGE_AGENT_SOCKET": str(tmp / "none.sock")},
            )
        )
    return plan


@contextlib.contextmanager
def agent_for(label: str, world: World, env: dict[str, str], binary: str) -> Iterator[int | None]:
    """The resident agent (its pid) while the agent variant runs; None for the others."""
    if label != AGENT:
        yield None
        return
    socket = env["PYBRIDGE_AGENT_SOCKET"]
    agent = subprocess.Popen(
        ["ip", "netns", "exec", world.host, binary, "agent", socket], stderr=subprocess.DEVNULL
    )
    try:
        while not os.path.exists(socket):
            time.sleep(0.02)
        yield agent.pid
    finally:
        agent.terminate()
        agent.wait(30)


def run_variants(
    args: argparse.Namespace, world: World, tmp: Path, plan: list[Variant]
) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for i, (label, binary, kind, ipam, env) in enumerate(plan):
        progress(f"[{i + 1}/{len(plan)}] {label}")
        config = conf(kind, ipam, f"brb{i}", f"10.{200 + i}.0.0/22", str(tmp / f"ipam{i}"))
        slow = label in ("pybridge in-process", "kind bundle (no agent)")
        with agent_for(label, world, env, binary) as pid:
            report = drive(
                world,
                tmp,
                binary,
                config,
                env,
                min(args.pods, 50) if slow else args.pods,
                args.parallel,
                0 if slow else args.scale,
                1 if slow else args.rounds,
            )
            if pid is not None:
                report["rss"] = rss_mib(pid)
        results[label] = report
    return results


def _pair(
    plan: list[Variant], tmp: Path, tag: str, bridge: str, octet: int
) -> tuple[tuple[str, dict[str, Any], dict[str, str]], tuple[str, dict[str, Any], dict[str, str]]]:
    """The reference's and the agent's (binary, conf, env) for a run alternating them: bridges
    `bridge`0 and `bridge`1, subnets 10.`octet`.0.0/22 and 10.`octet + 1`.0.0/22."""
    named = {variant[0]: variant for variant in plan}
    _, ref_binary, ref_kind, ref_ipam, ref_env = named["reference"]
    _, binary, kind, ipam, env = named[AGENT]
    ref_conf = conf(ref_kind, ref_ipam, f"{bridge}0", f"10.{octet}.0.0/22", str(tmp / f"ipam-{tag}-ref"))
    agent_conf = conf(kind, ipam, f"{bridge}1", f"10.{octet + 1}.0.0/22", str(tmp / f"ipam-{tag}-agent"))
    return (ref_binary, ref_conf, ref_env), (binary, agent_conf, env)


def paired(
    args: argparse.Namespace, world: World, tmp: Path, plan: list[Variant], results: dict[str, dict[str, Any]]
) -> None:
    """The sequential calls and parallel bursts again, the reference's and the agent's
    alternating in one driver."""
    progress(f"{args.pods} sequential pods and {args.rounds} rounds of parallel bursts, reference and agent "
             "alternating")
    (ref_binary, ref_conf, ref_env), (binary, agent_conf, env) = _pair(plan, tmp, "pair", "brp", 220)
    with agent_for(AGENT, world, env, binary):
        report = drive(world, tmp, binary, agent_conf, env, args.pods, args.parallel, 0, args.rounds,
                       pair=(ref_binary, ref_conf, ref_env))
    for label, key in ((AGENT, ""), ("reference", "pair_")):
        for figure in ("add", "check", "del", "par_add_wall"):
            results[label][f"paired_{figure}"] = report[f"{key}{figure}"]
        results[label]["par_errors"] += report[f"{key}par_errors"]
    for error in report["errors"]:  # the reference's calls are recorded as pair_add, pair_del, ...
        results["reference" if error["verb"].startswith("pair_") else AGENT]["errors"].append(error)


def churn(
    args: argparse.Namespace, world: World, tmp: Path, plan: list[Variant], results: dict[str, dict[str, Any]]
) -> None:
    """ADDs while `args.churn` other pods are deleted at once (bench/driver.py: churn_round), the
    reference's rounds and the agent's alternating in one driver."""
    progress(f"{args.churn_rounds} rounds of ADDs while {args.churn} pods are deleted, reference and agent "
             "alternating")
    (ref_binary, ref_conf, ref_env), (binary, agent_conf, env) = _pair(plan, tmp, "churn", "brk", 224)
    with agent_for(AGENT, world, env, binary):
        report = drive(world, tmp, binary, agent_conf, env, 0, 0, 0, 0, pair=(ref_binary, ref_conf, ref_env),
                       churn=(args.churn, args.churn_rounds))
    for label, key in (("reference", "pair_"), (AGENT, "")):
        results.setdefault(label, {"errors": []})
        for figure in ("churn_add", "churn_pending", "churn_del_walls"):
            results[label][figure] = report[f"{key}{figure}"]
    for error in report["errors"]:
        results["reference" if error["verb"].startswith("pair_") else AGENT]["errors"].append(error)


def churn_rows(results: dict[str, dict[str, Any]], pods: int) -> list[tuple[str, list[str]]]:
    """The churn figures, ratios to the reference: ADD p50/p99 while `pods` are deleted."""
    base = results["reference"]
    rows = []
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        cells = []
        for report in results.values():
            if not report.get("churn_add"):
                cells.append("-")
                continue
            value = pct(report["churn_add"], q)
            cells.append(f"{value:.1f} ({value / pct(base['churn_add'], q):.2f}x)")
        rows.append((f"ADD {name} ms while {pods} other pods are deleted (churn), rounds alternating", cells))
    rows.append(("churn: ADDs begun with a deleted pod's veth still there / ADDs timed",
                 [f"{r['churn_pending']} / {len(r['churn_add'])}" if r.get("churn_add") else "-"
                  for r in results.values()]))
    rows.append((f"churn: {pods} parallel DEL wall ms (median of rounds)",
                 [f"{pct(r['churn_del_walls'], 0.5):.1f}" if r.get("churn_del_walls") else "-"
                  for r in results.values()]))
    return rows


@contextlib.contextmanager
def claims_taken(path: str) -> Iterator[list[int]]:
    """A node controller's claim socket at `path` (cni_plugin/placement.py), its datagrams counted."""
    from cni_plugin.node.netpol import claims

    received, stop = [0], threading.Event()
    sock = claims.bind(path)

    def take() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                placement.read(sock.recv(placement.MAX_DATAGRAM))
                received[0] += 1

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    try:
        yield received
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def policy_overhead(
    args: argparse.Namespace, world: World, tmp: Path, plan: list[Variant], results: dict[str, dict[str, Any]]
) -> None:
    """The agent's sequential ADDs as kubelet's runtime makes them (K8S_POD_* in CNI_ARGS) with a
    node controller taking their claims, alternating with ADDs that send none (NetworkPolicy off):
    what announcing a new pod costs an ADD (docs/networkpolicy.md)."""
    _, binary, kind, ipam, env = {variant[0]: variant for variant in plan}[AGENT]
    progress(f"{args.pods} sequential pods, ADDs announcing their pod and ADDs not, alternating")
    on_env = {**env, "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=pod"}
    on_conf = conf(kind, ipam, "brq0", "10.222.0.0/22", str(tmp / "ipam-policy-on"))
    off_conf = conf(kind, ipam, "brq1", "10.223.0.0/22", str(tmp / "ipam-policy-off"))
    claim_path = str(Path(env["PYBRIDGE_AGENT_SOCKET"]).parent / "netpol.sock")
    with agent_for(AGENT, world, env, binary), claims_taken(claim_path) as received:
        report = drive(world, tmp, binary, on_conf, on_env, args.pods, 1, 0, 1, pair=(binary, off_conf, env))
    results[AGENT].update(policy_on_add=report["add"], policy_off_add=report["pair_add"], claims=received[0])
    results[AGENT]["errors"] += report["errors"]


def scale_without_pod_ipv6(
    args: argparse.Namespace, world: World, tmp: Path, plan: list[Variant], results: dict[str, dict[str, Any]]
) -> None:
    """The scale run again with IPv6 off in the pods: what the growth is without the pods' IPv6
    multicast (router solicitations, MLD reports, DAD), which the bridge floods to every port."""
    progress(f"turning IPv6 off in {args.scale} pods")
    for pod in world.pods[: args.scale]:
        sh("ip", "netns", "exec", pod, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
           "net.ipv6.conf.default.disable_ipv6=1")
    for i, (label, binary, kind, ipam, env) in enumerate(plan):
        if label not in (*REFERENCES, AGENT):
            continue
        progress(f"scale, pods without IPv6: {label}")
        config = conf(kind, ipam, f"brc{i}", f"10.{210 + i}.0.0/22", str(tmp / f"ipam-no6-{i}"))
        with agent_for(label, world, env, binary):
            report = drive(world, tmp, binary, config, env, 0, 0, args.scale, 1)
        results[label]["scale_add_no6"] = report["scale_add"]
        results[label]["errors"] += report["errors"]


def table(results: dict[str, dict[str, Any]], scale: int, parallel: int, churn: int
          ) -> list[tuple[str, list[str]]]:
    ref = results["reference"]
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, value: Any, fmt: str = "{:.1f}") -> None:
        cells = []
        base = value(ref)
        for report in results.values():
            v = value(report)
            if v is None or v != v:
                cells.append("-")
                continue
            ratio = f" ({v / base:.2f}x)" if base and base == base else ""
            cells.append(fmt.format(v) + ratio)
        rows.append((name, cells))

    for verb in ("add", "check", "del"):
        row(f"{verb.upper()} p50 ms", lambda r, v=verb: pct(r[v], 0.5) if r[v] else None)
        row(f"{verb.upper()} p99 ms", lambda r, v=verb: pct(r[v], 0.99) if r[v] else None)
    for verb in ("add", "check", "del"):
        row(f"{verb.upper()} p50 ms, calls alternating with the other variant's",
            lambda r, v=verb: pct(r[f"paired_{v}"], 0.5) if r.get(f"paired_{v}") else None)
    row(f"{parallel} parallel ADD wall ms (median of bursts)", lambda r: r["par_add_wall"])
    row(f"{parallel} parallel DEL wall ms (median of bursts)", lambda r: r["par_del_wall"])
    row(f"{parallel} parallel ADD wall ms, bursts alternating with the other variant's (median)",
        lambda r: r.get("paired_par_add_wall"))
    row("parallel errors", lambda r: r["par_errors"], "{:d}")
    row("parallel distinct IPs (fewest in a burst)", lambda r: r["par_distinct_ips"], "{:d}")
    if scale >= 100:
        for key, note in (("scale_add", ""), ("scale_add_no6", ", pods without IPv6")):
            row(f"ADD p50 ms, pods 1-50{note}",
                lambda r, k=key: pct(r[k][:50], 0.5) if r.get(k) else None)
            row(f"ADD p50 ms, pods {scale - 49}-{scale}{note}",
                lambda r, k=key: pct(r[k][-50:], 0.5) if r.get(k) else None)
    row("ADD p50 ms, announcing its pod to a node controller (NetworkPolicy on), alternating with",
        lambda r: pct(r["policy_on_add"], 0.5) if r.get("policy_on_add") else None)
    row("ADD p50 ms, announcing nothing (NetworkPolicy off)",
        lambda r: pct(r["policy_off_add"], 0.5) if r.get("policy_off_add") else None)
    row("claims the node controller received", lambda r: r.get("claims"), "{:d}")
    if any(r.get("churn_add") for r in results.values()):
        rows += churn_rows(results, churn)
    row("start-up (VERSION) ms", lambda r: r["startup"])
    row("agent RSS MiB", lambda r: r.get("rss"))
    return rows


def machine() -> str:
    cpus = os.cpu_count()
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    return (
        f"{cpus} vCPU ({model}), kernel {platform.release()}, Python {platform.python_version()} "
        f"(the project venv), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )


def commit() -> str:
    proc = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False)
    # Only code counts: the results file itself and the docs are rewritten around a run.
    code = ["cni_plugin", "ipam", "bench/run.py", "bench/driver.py", "bench/cri.py"]
    status = ["git", "-C", str(HERE.parent), "status", "--porcelain", "--untracked-files=no", "--", *code]
    dirty = subprocess.run(status, capture_output=True, text=True, check=False).stdout.strip()
    return (proc.stdout.strip() or "unknown") + (" (with uncommitted changes to the code)" if dirty else "")


def load() -> str:
    """The 1/5/15-minute load averages: other work on the machine skews wall times."""
    return " / ".join(Path("/proc/loadavg").read_text().split()[:3])


def cri_table(runtime: str, cri: dict[str, list[float]] | str, pods: int, blocks: int) -> list[str]:
    if isinstance(cri, str):
        return [f"CRI RunPodSandbox on {runtime}: not measured ({cri})."]
    ref = cri["reference"]
    lines = [f"| CRI RunPodSandbox on {runtime}, {pods} pods in {blocks} blocks per variant, the variants' "
             "alternating | "
             + " | ".join(cri) + " |",
             "|---" * (len(cri) + 1) + "|"]
    for name, q in (("p50 ms", 0.5), ("p95 ms", 0.95)):
        cells = [f"{pct(t, q):.1f} ({pct(t, q) / pct(ref, q):.2f}x)" for t in cri.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    floor = next((t for label, t in cri.items() if label.startswith("floor")), None)
    if floor:  # bench/cri.py: the runtime's own floor, no pod network
        base = pct(ref, 0.5) - pct(floor, 0.5)
        cells = [f"{(pct(t, 0.5) - pct(floor, 0.5)) / base:.2f}" for t in cri.values()]
        lines.append("| share of the pod start, (p50 - floor p50) / (reference p50 - floor p50) | "
                     + " | ".join(cells) + " |")
    return lines


def _shown(arg: str) -> str:
    """An argument as results.md shows it: a path of this machine by its name alone."""
    return os.path.basename(arg) if os.path.isabs(arg) else arg


def render(
    results: dict[str, dict[str, Any]], args: argparse.Namespace, imports: tuple[float, list[str]],
    cri: dict[str, dict[str, list[float]] | str] | None = None,
) -> str:
    names = {"reference": f"reference {args.reference_version} (Debian 12)",
             "reference sid": f"reference {args.sid_version} (Debian unstable)"}
    labels = [names.get(label, label) for label in results]
    sid_line = (f"sid's reference plugins: not measured ({args.sid_reference_missing})"
                if args.sid_reference_missing else
                f"sid's reference plugins: Debian unstable's {args.sid_version}")
    lines = [
        f"Machine: {machine()}",
        f"Commit: {args.commit}; command: `{' '.join(['bench/run.py', *map(_shown, sys.argv[1:])])}`",
        f"Load average (1/5/15 min) at the start: {args.load_at_start}; at the end: {load()}",
        f"Pods: {args.pods} sequential (in-process/bundle: {min(args.pods, 50)}), "
        f"{args.parallel} parallel in {args.rounds} bursts (in-process/bundle: 1), scale {args.scale} "
        "(then again with IPv6 off in the pods). "
        f"Churn: {args.churn_rounds} rounds of {CHURN_ADDS} ADDs timed while {args.churn} other pods are "
        "deleted. "
        f"Ratios are to the reference {args.reference_version} in the same run. {sid_line}.",
        "",
        "| figure | " + " | ".join(labels) + " |",
        "|---" * (len(labels) + 1) + "|",
    ]
    if args.churn_only:  # nothing but the churn figure, if any (then CRI, with --cri-pods)
        rows = churn_rows(results, args.churn) if results else []
    else:
        rows = table(results, args.scale, args.parallel, args.churn)
    for name, cells in rows:
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for runtime, timings in (cri or {}).items():
        lines += ["", *cri_table(runtime, timings, args.cri_pods, args.cri_blocks)]
    errors = {label: len(r["errors"]) for label, r in results.items()}
    lines += [
        "",
        f"Errors per variant: {errors}",
        f"Exec-path imports (python -IS -X importtime, launcher shim): {imports[0]:.1f} ms cumulative; "
        f"project modules: {', '.join(imports[1])}",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pods", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=32)
    parser.add_argument("--scale", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5,
                        help="parallel bursts per variant (1 for the slow ones); medians reported")
    parser.add_argument("--bundle", help="path of the kind bundle's pybridge, if built")
    parser.add_argument("--write", action="store_true", help="write bench/results.md")
    parser.add_argument("--json", help="also dump the raw timings here")
    parser.add_argument("--cri-pods", type=int, default=0,
                        help="also time CRI RunPodSandbox for this many pods (containerd, runc)")
    parser.add_argument("--churn", type=int, default=16,
                        help="pods deleted at once while ADDs are timed (0: no churn figure)")
    parser.add_argument("--churn-rounds", type=int, default=6, help="churn rounds per variant")
    parser.add_argument("--churn-only", action="store_true",
                        help="only the churn figure (reference and agent), nothing else")
    parser.add_argument("--no-sid", action="store_true",
                        help="without sid's reference plugins (Debian unstable's, scripts/sid.py)")
    args = parser.parse_args()
    args.load_at_start, args.commit = load(), commit()
    args.sid_version, args.sid_reference, args.sid_reference_missing = "", "", "--no-sid"
    if not args.no_sid:
        progress("sid's reference plugins (scripts/sid.py; cached for a week)")
        version, found = sid_reference()
        if version:
            args.sid_version, args.sid_reference, args.sid_reference_missing = version, found, ""
        else:
            args.sid_reference_missing = found
            progress(f"not measured: {found}")
    args.reference_version = reference_version()
    progress(f"making the netns of {max(args.pods, args.parallel, args.scale, args.churn + CHURN_ADDS)} pods")
    with (
        tempfile.TemporaryDirectory(prefix="pybridge-bench-") as tmpdir,
        World(max(args.pods, args.parallel, args.scale, args.churn + CHURN_ADDS)) as world,
    ):
        plan = variants(args, Path(tmpdir))
        results: dict[str, dict[str, Any]] = {}
        if not args.churn_only:
            results = run_variants(args, world, Path(tmpdir), plan)
            if args.parallel:
                paired(args, world, Path(tmpdir), plan, results)
            if args.scale >= 100:
                scale_without_pod_ipv6(args, world, Path(tmpdir), plan, results)
            policy_overhead(args, world, Path(tmpdir), plan, results)
        if args.churn:
            churn(args, world, Path(tmpdir), plan, results)
    cri: dict[str, dict[str, list[float]] | str] | None = None
    if args.cri_pods:
        waited = wait_for_netns_cleanup()
        progress(f"the kernel freed the pods' netns in {waited:.1f} s; timing CRI RunPodSandbox for "
                 f"{args.cri_pods} pods")
        sys.path.insert(1, str(HERE.parent))  # bench/cri.py drives the containerd tier's harness
        from cri import BLOCKS, run_pod_sandbox, runtimes

        args.cri_blocks = BLOCKS
        cri = {}
        for runtime_id, runtime in runtimes().items():
            if isinstance(runtime, str):
                cri[runtime_id] = runtime
                continue
            with tempfile.TemporaryDirectory(prefix="pbt-bench-cri-") as tmpdir:
                cri[runtime_id] = run_pod_sandbox(Path(tmpdir), args.cri_pods, runtime)
    progress("done; measuring the shim's imports")
    text = render(results, args, shim_imports(), cri)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    if args.write:
        results_md = HERE / "results.md"
        old = results_md.read_text() if results_md.exists() else ""
        # `make bench-netpol`'s section (written by hand from its output) stays
        kept = old[old.index(NETPOL_SECTION):] if NETPOL_SECTION in old else ""
        results_md.write_text(
            "# Benchmark results\n\n`make bench` output, committed as measured.\n\n" + text
            + ("\n" + kept if kept else "")
        )
    return 1 if any(r["errors"] or r.get("par_errors") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

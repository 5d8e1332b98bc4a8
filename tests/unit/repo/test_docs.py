"""The docs cannot drift silently: every `make` target, repository path, link and CLI flag that
README.md and docs/*.md name exists, every flag of the pybridge and pyipam commands is documented
in docs/, and the README's Layout names every module.

Only code (inline `spans` and fenced blocks) and links are read: prose may say "make sure".
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# The commands whose flags must be documented, as `python -m ...` arguments.
COMMANDS = [
    ("cni_plugin", "agent"), ("cni_plugin", "ls"), ("cni_plugin", "doctor"), ("cni_plugin", "gc"),
    ("cni_plugin", "node", "run"), ("cni_plugin", "node", "install"),
    ("ipam", "ls"), ("cni_plugin.install",),
]
# Flags the docs quote from other programs (systemctl, debootstrap, ctr, nsenter, mypy...).
OTHER_PROGRAMS_FLAGS = {"--now", "--variant", "--cni", "--net", "--strict", "--version", "--rm"}
# The packages whose modules the README's Layout must name.
LAYOUT_PACKAGES = ["cnikit", "cni_plugin", "cni_plugin/agent", "cni_plugin/ops", "cni_plugin/node", "ipam",
                   "bench", "scripts", "testbed"]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
MAKE = re.compile(r"\bmake ((?:[A-Z_]+=\S+ )*)([a-z][a-z0-9-]*)")


def _code(text: str) -> list[str]:
    """The fenced blocks and inline spans of a markdown text."""
    blocks = FENCE.findall(text)
    prose = FENCE.sub("", text)
    return blocks + SPAN.findall(prose)


@functools.cache
def _texts() -> dict[Path, str]:
    return {path: path.read_text() for path in DOCS}


@functools.cache
def _tracked() -> frozenset[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"the docs tests list the repository with `git ls-files` in a clone ({exc}): "
                    "apt-get install git (make deps does)")
    return frozenset(out.split())


def _top_level() -> set[str]:
    return {name.split("/")[0] for name in _tracked()} | {"docs"}


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    targets = set()
    for line in text.splitlines():
        if m := re.match(r"^([A-Za-z0-9_. $()/-]+):(?!=)", line):
            targets.update(t for t in m.group(1).split() if "$" not in t)
    return targets


def test_docs_exist() -> None:
    assert (REPO / "docs").is_dir() and len(DOCS) > 1


def test_named_make_targets_exist() -> None:
    targets = _make_targets()
    named = {(path.name, m.group(2)) for path, text in _texts().items() for code in _code(text)
             for m in MAKE.finditer(code)}
    assert named, "no make target found in the docs: the pattern is broken"
    missing = sorted(f"{doc}: make {target}" for doc, target in named if target not in targets)
    assert not missing, f"targets named in the docs but not in the Makefile: {missing}"


def _path_words(code: str) -> list[str]:
    words = []
    for word in re.split(r"[\s=,;()\[\]\"']+", code):
        word = word.rstrip(".:").removesuffix("'s")
        if not word or any(c in word for c in "<>*${}|#~") or word.startswith(("/", "-", "http")):
            continue
        words.append(word)
    return words


def test_named_repository_paths_exist() -> None:
    top = _top_level()
    tracked = _tracked()
    dirs = {str(Path(name).parent) for name in tracked}
    dirs |= {str(p) for d in list(dirs) for p in Path(d).parents}
    checked, missing = 0, []
    for path, text in _texts().items():
        for code in _code(text):
            for word in _path_words(code):
                first = word.split("/")[0]
                if first not in top or ("/" not in word and first not in tracked):
                    continue
                checked += 1
                name = word.rstrip("/")
                if name not in tracked and name not in dirs and not (REPO / name).exists():
                    missing.append(f"{path.name}: {word}")
    assert checked > 50, f"only {checked} paths checked: the pattern is broken"
    assert not missing, f"paths named in the docs that the repository does not have: {sorted(set(missing))}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_links_resolve() -> None:
    bad = []
    for path, text in _texts().items():
        for target in LINK.findall(FENCE.sub("", text)):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                bad.append(f"{path.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", FENCE.sub("", dest.read_text()), re.M)
                if anchor not in {_slug(h) for h in headings}:
                    bad.append(f"{path.name}: {target} (no such heading)")
    assert not bad, bad


@functools.cache
def _cli_flags() -> dict[str, set[str]]:
    flags: dict[str, set[str]] = {}
    for command in COMMANDS:
        run = subprocess.run([sys.executable, "-m", *command, "--help"], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        name = " ".join(command)
        flags[name] = set(FLAG.findall(run.stdout)) - {"--help"}
    return flags


def test_every_cli_flag_is_documented_in_docs() -> None:
    docs = "\n".join(text for path, text in _texts().items() if path.parent.name == "docs")
    documented = set(FLAG.findall("\n".join(_code(docs))))
    missing = sorted(f"{command} {flag}" for command, flags in _cli_flags().items() for flag in flags
                     if flag not in documented)
    assert sum(map(len, _cli_flags().values())) > 20, "too few flags found: --help parsing is broken"
    assert not missing, f"CLI flags no page of docs/ names (in code): {missing}"


def test_every_flag_the_docs_name_exists() -> None:
    known = set().union(*_cli_flags().values()) | OTHER_PROGRAMS_FLAGS
    named = {(path.name, flag) for path, text in _texts().items() for code in _code(text)
             for flag in FLAG.findall(code)}
    unknown = sorted(f"{doc}: {flag}" for doc, flag in named if flag not in known)
    assert not unknown, f"flags the docs name that no pybridge command has: {unknown}"


def _layout() -> str:
    readme = _texts()[REPO / "README.md"]
    section = readme.split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    blocks = FENCE.findall(section)
    assert blocks, "README.md has no Layout block"
    return blocks[0]


@pytest.mark.parametrize("package", LAYOUT_PACKAGES)
def test_layout_names_every_module(package: str) -> None:
    layout = _layout()
    entry = re.search(rf"^{re.escape(package)}/ (.*?)(?=^\S)", layout + "\nEND", re.M | re.S)
    assert entry, f"README.md Layout has no line for {package}/"
    names = set(re.findall(r"[\w.-]+\.(?:py|c|sh|md)\b", entry.group(1)))
    files = {Path(f).name for f in _tracked() if str(Path(f).parent) == package
             and Path(f).suffix in (".py", ".c", ".sh", ".md") and Path(f).name != "__init__.py"}
    assert files - names == set(), f"README.md Layout omits {sorted(files - names)} under {package}/"
    assert names - files == set(), f"README.md Layout names {sorted(names - files)} that {package}/ lacks"


def test_layout_names_every_test_tier() -> None:
    tiers = {Path(f).parts[1] for f in _tracked() if f.startswith("tests/") and len(Path(f).parts) > 2}
    layout = _layout()
    missing = sorted(t for t in tiers if not re.search(rf"\b{re.escape(t)}/", layout))
    assert not missing, f"README.md Layout omits tests/{missing}"


def test_systemd_units_link_to_installed_docs() -> None:
    """Every Documentation= of conf/'s units is a file `make install` puts under PREFIX."""
    prefix = "/opt/pybridge"
    dry = subprocess.run(["make", "-n", "-C", str(REPO), "install", f"PREFIX={prefix}"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    installed = _installed_docs(dry, prefix)
    links = [(unit.name, uri) for unit in sorted((REPO / "conf").glob("*.s*"))
             if unit.suffix in (".service", ".socket")
             for line in unit.read_text().splitlines() if line.startswith("Documentation=")
             for uri in line.partition("=")[2].split()]
    assert len(links) >= 2, "no Documentation= found in conf/*.service, *.socket"
    bad = [f"{unit}: {uri}" for unit, uri in links
           if not uri.startswith(("http://", "https://")) and uri.removeprefix("file://") not in installed]
    assert not bad, f"unit links to files make install does not install: {bad}"


def _installed_docs(dry_run: str, prefix: str) -> set[str]:
    """The doc files `make -n install` copies: `install -m MODE FILE... DIR/` lines, each source
    file checked to exist in the repository."""
    installed = set()
    for command in re.split(r"\n|&&", dry_run):
        words = command.split()
        if words[:1] != ["install"] or "-d" in words or not words[-1].startswith(f"{prefix}/share/doc"):
            continue
        dest, sources = words[-1], [w for w in words[1:-1] if not w.startswith("-") and not w.isdigit()]
        for pattern in sources:
            for source in sorted(REPO.glob(pattern)):
                installed.add(f"{dest.rstrip('/')}/{source.name}")
    return installed

"""The change from one ruleset of nft.ruleset() to the next as one nft transaction; pure and unit
tested.

A script is read back into its model (per table: each set's header and elements, each chain's
header and rules), and two models give the commands turning the first into the second: elements
added to and deleted from the sets and verdict maps that stay, chains flushed and written again
where their rules changed, new sets and chains added, gone ones deleted. Names in the ruleset are
stable (nft.py), so a pod coming or going is element operations, and a policy changing rewrites
its own chains and sets. nft commits the whole script or none of it: the rules in force are the
old ones or the new ones, never a mix.

What the model cannot say as such a change (a base chain, a chain's comment or a set's type that
differs, a table that appears or goes) gives None: the caller replaces the tables whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_BLOCKS = ("set ", "map ", "chain ")


@dataclass(frozen=True)
class Block:
    """A set, map or chain: its kind, its header lines (type, flags, hook, comment) and its
    elements (sets, maps) or rules (chains), in order."""

    kind: str
    header: tuple[str, ...]
    body: tuple[str, ...]


Table = Mapping[str, Block]  # by name
Model = Mapping[tuple[str, str], Table]  # by (family, table name)


def parse(script: str) -> Model:
    """The tables a script of nft.ruleset() defines. No element holds a comma (nft.census)."""
    model: dict[tuple[str, str], dict[str, Block]] = {}
    table: dict[str, Block] | None = None
    name = kind = ""
    header: list[str] = []
    body: list[str] = []
    for line in script.splitlines():
        depth = len(line) - len(line.lstrip("\t"))
        text = line.strip()
        if depth == 0 and text.startswith("table ") and text.endswith("{"):
            family, table_name = text.split()[1:3]
            table = model.setdefault((family, table_name), {})
        elif depth == 1 and table is not None and text.startswith(_BLOCKS):
            kind, name = text.split()[:2]
            header, body = [], []
        elif depth == 1 and text == "}" and table is not None:
            table[name] = Block(kind, tuple(header), tuple(body))
        elif depth == 2 and kind == "chain":
            (header if text.startswith(("type ", "comment ")) else body).append(text)
        elif depth == 2 and text.startswith("elements = {"):
            body.extend(text.removeprefix("elements = {").removesuffix("}").strip().split(", "))
        elif depth == 2:
            header.append(text)
    return model


def _key(element: str) -> str:
    """A map element's key (`addr : jump chain`): what delete takes."""
    return element.split(" : ", 1)[0]


def _elements(verb: str, where: str, elements: Iterable[str]) -> list[str]:
    items = list(elements)
    return [f"{verb} element {where} {{ {', '.join(items)} }}"] if items else []


def _declare(kind: str, where: str, block: Block) -> str:
    return f"add {kind} {where} {{ {' ; '.join(block.header)} ; }}" if block.header else f"add {kind} {where}"


def _table(family: str, name: str, old: Table, new: Table) -> list[str] | None:
    """The commands turning table `old` into `new`, in an order nft takes in one transaction:
    what rules will name exists before them, what is deleted is named by nothing any more."""
    for block_name in old.keys() & new.keys():
        before, after = old[block_name], new[block_name]
        if before.kind != after.kind or before.header != after.header:
            return None
    if any(any(h.startswith("type ") for h in b.header) for b in
           [*(new[n] for n in new.keys() - old.keys() if new[n].kind == "chain"),
            *(old[n] for n in old.keys() - new.keys() if old[n].kind == "chain")]):
        return None  # a base chain added or removed
    prefix = f"{family} {name}"
    added = sorted(new.keys() - old.keys())
    gone = sorted(old.keys() - new.keys())
    kept = sorted(old.keys() & new.keys())
    declare = [_declare(new[n].kind, f"{prefix} {n}", new[n]) for n in added]
    rewritten = [n for n in kept if new[n].kind == "chain" and old[n].body != new[n].body]
    flush = [f"flush chain {prefix} {n}" for n in [*rewritten, *(n for n in gone if old[n].kind == "chain")]]
    written = [*rewritten, *(n for n in added if new[n].kind == "chain")]
    rules = [f"add rule {prefix} {n} {rule}" for n in written for rule in new[n].body]
    deleted: list[str] = []
    inserted: list[str] = []
    for n in kept:
        if new[n].kind == "chain" or old[n].body == new[n].body:  # most sets: compared in C, none hashed
            continue
        had, has = set(old[n].body), set(new[n].body)
        # A map element whose verdict changed is deleted by its key, then added with the new one.
        removed = sorted({_key(e) for e in had - has} if new[n].kind == "map" else had - has)
        deleted += _elements("delete", f"{prefix} {n}", removed)
        inserted += _elements("add", f"{prefix} {n}", sorted(has - had))
    for n in added:
        if new[n].kind != "chain":
            inserted += _elements("add", f"{prefix} {n}", new[n].body)
    drops = [f"delete {old[n].kind} {prefix} {n}" for n in gone]
    drops.sort(key=lambda line: not line.startswith("delete chain"))  # chains first: they name the sets
    return [*declare, *flush, *rules, *deleted, *inserted, *drops]


def diff(old: Model, new: Model) -> str | None:
    """One nft script turning the tables of `old` into those of `new` ("" when equal), or None
    when that is not a change of elements and non-base chains (then replace them whole)."""
    if old.keys() != new.keys():
        return None
    commands: list[str] = []
    for family, name in sorted(new):
        table = _table(family, name, old[(family, name)], new[(family, name)])
        if table is None:
            return None
        commands += table
    return "".join(f"{c}\n" for c in commands)

#!/usr/bin/env python3
"""Fail the image build unless docker/constraints.txt pins exactly what the image installs.

    python check_pins.py CONSTRAINTS                 # the distributions this interpreter sees (a venv)
    python check_pins.py CONSTRAINTS --wheels DIR    # the wheels in DIR (the builder's /wheels)

Every distribution found must have an ``==`` pin in CONSTRAINTS with the same version, and every pin
must be one that is found (no stale pins), apart from the names given with ``--project`` (PainterBot
itself, built from the checkout). Names compare as PEP 503 normalises them, versions as PEP 440
does (``13.0.3`` == ``13.0.3.0``). Exit 0 with a one-line summary, or 1 listing every problem.
Standard library only: it runs before and after the venv exists.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def canonical_version(version: str) -> str:
    """PEP 440 equality for the plain versions found here: case, leading 'v', trailing '.0's of the release."""
    v = version.strip().lower().lstrip("v")
    m = re.match(r"^(\d+(?:\.\d+)*)(.*)$", v)
    if not m:
        return v
    release = [int(x) for x in m.group(1).split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    return ".".join(map(str, release)) + m.group(2)


def read_pins(path: Path) -> tuple[dict[str, str], list[str]]:
    pins, problems = {}, []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.!+_-]+)", line)
        if not m:
            problems.append(f"{path.name}:{number}: not an exact 'name==version' pin: {raw.strip()}")
            continue
        name = canonical_name(m.group(1))
        if name in pins:
            problems.append(f"{path.name}:{number}: {name} pinned twice")
        pins[name] = m.group(2)
    return pins, problems


def installed() -> dict[str, str]:
    from importlib.metadata import distributions

    found = {}
    for dist in distributions():
        name = dist.metadata["Name"]
        if name:
            found[canonical_name(name)] = dist.version
    return found


def wheels(folder: Path) -> dict[str, str]:
    found = {}
    for wheel in folder.glob("*.whl"):
        # {distribution}-{version}(-{build})?-{python}-{abi}-{platform}.whl, name/version escaped with '_'
        name, version = wheel.name.split("-")[:2]
        found[canonical_name(name)] = version.replace("_", "-")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("constraints", type=Path)
    p.add_argument("--wheels", type=Path, help="check the wheels in this folder instead of the installed distributions")
    p.add_argument("--project", action="append", default=[], help="a distribution that needs no pin (repeatable)")
    args = p.parse_args(argv)

    pins, problems = read_pins(args.constraints)
    found = wheels(args.wheels) if args.wheels else installed()
    where = str(args.wheels) if args.wheels else sys.prefix
    projects = {canonical_name(n) for n in args.project}
    for name, version in sorted(found.items()):
        if name in projects:
            continue
        if name not in pins:
            problems.append(f"unpinned: {name}=={version} is in {where} but not in {args.constraints.name}")
        elif canonical_version(pins[name]) != canonical_version(version):
            problems.append(f"wrong version: {name}=={version} in {where}, {args.constraints.name} pins {pins[name]}")
    for name in sorted(set(pins) - set(found)):
        problems.append(f"stale pin: {name}=={pins[name]} is not in {where}")
    if problems:
        print(f"check_pins: {len(problems)} problem(s) with {args.constraints}:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"check_pins: {len(found) - len(projects & set(found))} distributions in {where}, "
          f"each pinned exactly by {args.constraints.name}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

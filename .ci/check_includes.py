#!/usr/bin/env python3
"""Checks the direction of #include lines between the folders of include/ctxcomp.

Floors, bottom to top: core -> nn, attention, kv -> digest, fold, anchor -> io -> engines.
A header may include its own folder and any folder on a lower floor; never a folder beside it on
its own floor, nor one above. The umbrella header (ctxcomp.hpp) may include everything.
Exits 1 and names every offending line.
"""
import pathlib
import re
import sys

FLOORS = [["core"], ["nn", "attention", "kv"], ["digest", "fold", "anchor"], ["io"], ["engines"]]
FLOOR = {folder: i for i, names in enumerate(FLOORS) for folder in names}

root = pathlib.Path(__file__).resolve().parent.parent / "include" / "ctxcomp"
include = re.compile(r'^\s*#\s*include\s+"([^"]+)"')
bad = []
for header in sorted(root.rglob("*.hpp")):
    rel = header.relative_to(root)
    if len(rel.parts) == 1:
        continue  # the umbrella
    folder = rel.parts[0]
    if folder not in FLOOR:
        bad.append(f"{rel}: folder '{folder}' has no floor (add it to FLOORS in {pathlib.Path(__file__).name})")
        continue
    for n, line in enumerate(header.read_text().splitlines(), 1):
        m = include.match(line)
        if not m:
            continue
        target = (header.parent / m.group(1)).resolve()
        try:
            to = target.relative_to(root).parts[0]
        except ValueError:
            continue  # outside the library (none today)
        if to == folder:
            continue
        if to not in FLOOR:
            bad.append(f"{rel}:{n}: includes '{m.group(1)}', outside every floor")
        elif FLOOR[to] == FLOOR[folder]:
            bad.append(f"{rel}:{n}: includes '{m.group(1)}' from '{to}', beside '{folder}' on the same floor")
        elif FLOOR[to] > FLOOR[folder]:
            bad.append(f"{rel}:{n}: includes '{m.group(1)}' from '{to}', a floor above '{folder}'")
for b in bad:
    print(b)
print(f"include direction: {len(bad)} violation(s)")
sys.exit(1 if bad else 0)

#!/usr/bin/env python3
"""docs/integration.md's code listings are parts of the examples that CI builds and runs.

A listing in the guide is written as

    <!-- listing: examples/engine_sac.cpp#sac-compress -->
    ```cpp
    ...
    ```

and must equal, line for line, the lines between `// [guide:sac-compress]` and the next
`// [guide:end]` in that file, with their common indentation removed. Exit 1 names every
listing that differs (or whose region is missing), and every marked region no listing shows.
--write replaces each listing's body with its region (after editing an example).

    python3 tests/docs/check_guide_listings.py [--write] [SOURCE_DIR]
"""
import os
import re
import sys
import textwrap

LISTING = re.compile(r"<!-- listing: (?P<path>[^#\s]+)#(?P<name>[\w-]+) -->\n```cpp\n(?P<body>.*?)```", re.S)
REGION = re.compile(r"^[ \t]*// \[guide:(?P<name>[\w-]+)\]\n(?P<body>.*?)^[ \t]*// \[guide:end\]\n", re.S | re.M)


def regions(path):
    with open(path, encoding="utf-8") as f:
        return {m["name"]: textwrap.dedent(m["body"]) for m in REGION.finditer(f.read())}


def main():
    args = [a for a in sys.argv[1:] if a != "--write"]
    write = "--write" in sys.argv[1:]
    root = args[0] if args else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    guide = os.path.join(root, "docs", "integration.md")
    with open(guide, encoding="utf-8") as f:
        text = f.read()
    listings = list(LISTING.finditer(text))
    if not listings:
        print(f"{guide}: no listings found (<!-- listing: FILE#NAME --> before a ```cpp block)")
        return 1
    errors, shown, files, fixed = [], set(), {}, []
    for m in listings:
        path, name = m["path"], m["name"]
        if path not in files:
            full = os.path.join(root, path)
            if not os.path.isfile(full):
                errors.append(f"listing {path}#{name}: no file {path}")
                continue
            files[path] = regions(full)
        shown.add((path, name))
        want = files[path].get(name)
        if want is None:
            errors.append(f"listing {path}#{name}: {path} has no region // [guide:{name}] ... // [guide:end]")
        elif want != m["body"] and write:
            fixed.append((m.start("body"), m.end("body"), want))
        elif want != m["body"]:
            line = text.count("\n", 0, m.start()) + 1
            errors.append(f"listing {path}#{name} (docs/integration.md line {line}) differs from the code; "
                          f"paste the region again:\n{want}")
    for path, names in files.items():
        for name in names:
            if (path, name) not in shown:
                errors.append(f"{path}: region [guide:{name}] is not shown in docs/integration.md")
    if fixed:
        for start, end, body in reversed(fixed):
            text = text[:start] + body + text[end:]
        with open(guide, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"{len(fixed)} listing(s) rewritten from the code")
    for e in errors:
        print(e)
    print(f"{len(listings)} listings checked, {len(errors)} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

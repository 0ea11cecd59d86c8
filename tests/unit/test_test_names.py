"""Test modules are imported by basename (rootdir-relative, no __init__.py): two files with one
basename stop the whole collection in a clean checkout (it happened twice)."""
import collections
import os

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)


def test_every_test_module_has_its_own_basename():
    seen = collections.defaultdict(list)
    for root, _, files in os.walk(TESTS):
        for f in files:
            if f.startswith("test_") and f.endswith(".py"):
                seen[f].append(os.path.relpath(os.path.join(root, f), TESTS))
    assert not {k: v for k, v in seen.items() if len(v) > 1}

"""'Did you mean ...?': the closest of the names a user can type, by edit distance."""

from __future__ import annotations

from collections.abc import Iterable


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions to turn ``a`` into ``b``."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def closest(word: str, names: Iterable[str]) -> str | None:
    """The name nearest ``word`` by edit distance (ties: the shorter, then alphabetical), or None when even
    that one differs in more than a third of the word's characters (at least 2 edits are always allowed)."""
    ranked = sorted((edit_distance(word.lower(), n.lower()), len(n), n) for n in set(names))
    if not ranked:
        return None
    distance, _, name = ranked[0]
    return name if distance <= max(2, len(word) // 3) else None


__all__ = ["closest", "edit_distance"]

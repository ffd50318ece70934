"""Channel groups of a dependency graph: tensor dims claimed by layers, ids joined into classes, classes into groups.

Apart from the tracer so that how channels are grouped (and which must keep equal counts per block) reads on its own.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

@dataclass
class Claim:
    """One dim of a weight (``dim=None``: every element of a loose parameter) and the channel of each position.

    ``ids`` hold tracer ids while tracing and class indices in a built graph; -1 marks a fixed position.
    ``owner``: the layer (or attention module) a group rooted here is named after; ``modules``: the modules using
    the tensor; ``role``: "weight", "bias", "bn_weight", "norm", "stat" (running statistics) or "loose";
    ``source``: the dim produces new channels (a layer's outputs);
    ``blocks``: the positions form equal contiguous blocks that must keep equal counts (grouped conv, GroupNorm);
    ``grouped``: a grouped conv's input dim, whose tensor dim holds positions // grouped entries.
    """

    tensor: str
    dim: int | None
    ids: np.ndarray
    owner: str
    modules: set[str]
    role: str
    source: bool = False
    blocks: int = 1
    grouped: int = 1


@dataclass
class Group:
    """Channels (neurons, heads) that are kept or removed as units; all units touch the same claims alike.

    ``key``: the owner of the first claim that produces them (a layer or attention module name); ``width``:
    positions per unit in that claim; ``footprint``: (claim index, positions per unit) for every claim touched;
    ``blocks``: each unit's block index when blocks must keep equal counts; ``reason``: why it is not pruned.
    """

    key: str
    classes: np.ndarray
    width: int
    footprint: list[tuple[int, int]]
    blocks: np.ndarray | None = None
    reason: str | None = None

    @property
    def size(self) -> int:
        return len(self.classes)

    @property
    def nblocks(self) -> int:
        return 1 if self.blocks is None else int(self.blocks.max()) + 1


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """The smallest id in each id's connected component, for ``n`` ids joined by ``pairs``.

    Args:
        n: the number of ids.
        pairs: [k, 2] pairs of ids that are one channel.

    Returns:
        [n] the root id of each id.
    """
    root = np.arange(n)
    if not len(pairs):
        return root
    a, b = pairs[:, 0], pairs[:, 1]
    while True:
        low = np.minimum(root[a], root[b])
        new = root.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        np.minimum.at(new, root, new)
        while not np.array_equal(new, new[new]):
            new = new[new]
        if np.array_equal(new, root):
            return root
        root = new


def make_groups(claims: list[Claim], pinned: dict[int, str]) -> list[Group]:
    """Classes touching the same claims the same number of times form a group, in order of first appearance.

    Args:
        claims: the claims, their ids already mapped to classes.
        pinned: class -> why it must stay.

    Returns:
        The groups rooted at some claim that produces channels; a pinned or unsplittable one carries its reason.
    """
    footprint: dict[int, list[tuple[int, int]]] = defaultdict(list)
    first: dict[int, tuple[int, int]] = {}
    for ci, c in enumerate(claims):
        valid = np.flatnonzero(c.ids >= 0)
        if not len(valid):
            continue
        uniq, idx, counts = np.unique(c.ids[valid], return_index=True, return_counts=True)
        for k, p, n in zip(uniq.tolist(), valid[idx].tolist(), counts.tolist()):
            footprint[k].append((ci, n))
            first.setdefault(k, (ci, p))
    by_footprint: dict[tuple, list[int]] = defaultdict(list)
    for k in sorted(footprint, key=first.__getitem__):
        if any(claims[ci].source for ci, _ in footprint[k]):
            by_footprint[tuple(footprint[k])].append(k)
    groups, used = [], Counter()
    for fp, classes in by_footprint.items():
        root = min(ci for ci, _ in fp if claims[ci].source)
        key = claims[root].owner
        used[key] += 1
        key = key if used[key] == 1 else f"{key}#{used[key]}"
        members = np.array(classes, dtype=np.int64)
        reason = next((pinned[k] for k in classes if k in pinned), None)
        blocks, why = _blocks(claims, fp, members)
        if reason is None and len(classes) < 2:
            reason = "it has a single channel"
        groups.append(Group(key, members, dict(fp)[root], list(fp), blocks, reason or why))
    return groups


def _blocks(claims: list[Claim], fp: tuple, members: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """Each member's block where some claim needs equal counts per block, or the reason that cannot hold."""
    blocks = None
    for ci, _ in fp:
        c = claims[ci]
        if c.blocks == 1:
            continue
        why = "its channels form grouped-conv / GroupNorm blocks that cannot keep equal counts"
        if not np.isin(c.ids, members).all():
            return None, why
        size = len(c.ids) // c.blocks
        block_of = np.full(int(members.max()) + 1, -1)
        for b in range(c.blocks):
            part = np.unique(c.ids[b * size:(b + 1) * size])
            if (block_of[part] >= 0).any():
                return None, why
            block_of[part] = b
        mine = block_of[members]
        if blocks is not None and len(set(zip(blocks.tolist(), mine.tolist()))) != len(set(mine.tolist())):
            return None, why
        if len(set(np.bincount(mine).tolist())) != 1:
            return None, why
        blocks = mine
    return blocks, None

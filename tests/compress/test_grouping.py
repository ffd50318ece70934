"""dsx.compress.grouping: channel ids joined by shared ops fall into one component, rooted at its smallest id."""

import numpy as np

from dsx.compress.grouping import components


def test_components_root_each_id_at_its_smallest_member():
    roots = components(7, np.array([[5, 2], [2, 4], [6, 1]]))
    assert roots.tolist() == [0, 1, 2, 3, 2, 2, 1]


def test_no_pairs_leaves_every_id_alone_and_chains_collapse():
    assert components(3, np.zeros((0, 2), dtype=np.int64)).tolist() == [0, 1, 2]
    chain = np.array([[i, i + 1] for i in range(9)][::-1])
    assert components(10, chain).tolist() == [0] * 10

"""dsx.core.atomic: a directory save is swapped in by rename; a swap cut between its renames is recovered."""

from dsx.core.atomic import commit, partial, previous, recover, start, write_bytes


def test_commit_replaces_the_old_directory_and_leaves_no_sibling(tmp_path):
    final = tmp_path / "save"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp = start(final)
    assert tmp == partial(final) and tmp.is_dir() and not any(tmp.iterdir())
    write_bytes(tmp / "new.txt", b"new")
    assert commit(tmp, final) == final
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["save"]


def test_start_clears_a_stale_partial_and_recovers_a_swap_cut_between_its_renames(tmp_path):
    final = tmp_path / "save"
    previous(final).mkdir()
    (previous(final) / "kept.txt").write_text("kept")
    partial(final).mkdir()
    (partial(final) / "junk").write_text("junk")
    tmp = start(final)
    assert (final / "kept.txt").read_text() == "kept" and not previous(final).exists()
    assert not any(tmp.iterdir())


def test_recover_does_nothing_when_the_target_exists(tmp_path):
    final = tmp_path / "save"
    final.mkdir()
    previous(final).mkdir()
    recover(final)
    assert final.is_dir() and previous(final).is_dir()

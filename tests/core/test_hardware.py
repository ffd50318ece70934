"""Tests for dsx.core.hardware: CPU flags are read once, and int8 dot products follow VNNI / AMX."""

import pytest

from dsx.core import hardware


def test_cpu_flags_are_a_cached_frozenset():
    flags = hardware.cpu_flags()
    assert isinstance(flags, frozenset) and hardware.cpu_flags() is flags


@pytest.mark.parametrize("flags,expected", [
    ({"avx2", "fma"}, False),
    ({"avx2", "avx512f", "avx512_vnni"}, True),
    ({"avx2", "amx_int8", "amx_tile"}, True),
    (set(), False),
])
def test_int8_dot_products_need_vnni_or_amx(monkeypatch, flags, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert hardware.has_int8_dot() is expected

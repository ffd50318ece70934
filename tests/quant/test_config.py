"""Quantization configs: every valid format string resolves, round-trips through its dict, and bad ones are named."""

import pytest

from dsx.quant import Int8Static, valid_formats
from dsx.quant.config import QuantConfig, resolve_config


@pytest.mark.parametrize("fmt", valid_formats())
def test_every_format_resolves_and_round_trips_through_its_dict(fmt):
    config = resolve_config(fmt)
    assert isinstance(config, QuantConfig)
    assert resolve_config(config.to_dict()) == config
    assert resolve_config(config) is config


def test_settings_survive_the_dict_round_trip():
    config = Int8Static(observer="percentile", smoothquant=0.5)
    assert resolve_config(config.to_dict()) == config


def test_unknown_and_wrongly_typed_configs_are_named():
    with pytest.raises(ValueError, match="valid formats are"):
        resolve_config("int3")
    with pytest.raises(TypeError, match="config"):
        resolve_config(8)

"""The method registry: one ``register`` per quantizer module, read by the config and the factory."""

from __future__ import annotations

import typing

import pytest
import torch

from flexround_pl.quant import base
from flexround_pl.quant.config import GridConfig, QuantConfig


def test_the_config_literal_is_the_registry():
    literal = typing.get_type_hints(QuantConfig)["method"]
    assert set(typing.get_args(literal)) == set(base.METHODS)
    assert {"rtn", "flexround", "adaround", "nupes"} <= set(base.METHODS)


@pytest.mark.parametrize("name", sorted(base.METHODS))
def test_every_registered_method_builds_its_own_quantizer(name):
    w = torch.randn(6, 8)
    cfg = QuantConfig(method=name, weight=GridConfig(bits=4, granularity="channel", init="minmax"))
    q = base.build_quantizer(w, cfg, is_conv=False)
    assert isinstance(q, base.WeightQuantizer)
    codes = q.codes(w)
    assert codes.shape == w.shape and int(codes.min()) >= q.qmin and int(codes.max()) <= q.qmax


def test_an_unknown_method_is_refused_with_the_registered_names():
    with pytest.raises(ValueError, match="quantization method must be one of .*flexround.*, got 'awq'"):
        QuantConfig(method="awq")


def test_a_second_registration_under_one_name_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        base.register("flexround", lambda *a: None)
    assert base.METHODS["flexround"].build is not None

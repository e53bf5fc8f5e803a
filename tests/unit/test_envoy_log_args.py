"""Envoy's log flags (decision 0130): at debug or trace the components that print header
maps stay at info; other levels are passed through untouched."""

from __future__ import annotations

import pytest

from extproc.devstack import envoy_log_args


@pytest.mark.parametrize("level", ["debug", "trace"])
def test_verbose_levels_keep_header_printing_components_at_info(level: str) -> None:
    assert envoy_log_args(level) == [
        "--log-level", level,
        "--component-log-level", "http:info,router:info,ext_proc:info,ext_authz:info"]


@pytest.mark.parametrize("level", ["info", "warn", "error", "critical", "off"])
def test_quieter_levels_are_not_raised(level: str) -> None:
    assert envoy_log_args(level) == ["--log-level", level]

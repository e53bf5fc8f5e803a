"""Starting the real extproc and Envoy from a config document, for the e2e suites that
build their own multi-emulator config (the provider and SDK matrices) instead of
tests/conftest.py's `gateway_config`.

The config is written with its pepper file beside it (`auth.pepper.file: pepper.txt`),
each provider key goes to extproc as the environment variable `<PREFIX>_<NAME>` the
config names, and Envoy is rendered from the same file the service loads, so the suite
runs the exact bootstrap an operator would.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from extproc.config import load_config
from extproc.devstack import Stack, free_port
from extproc.envoy_bootstrap import EnvoyPorts, render_yaml

__all__ = ["start_from_config"]


def start_from_config(stack: Stack, config: Mapping[str, Any], *, pepper: str,
                      key_env_prefix: str, provider_keys: Mapping[str, str]) -> int:
    """Write `config` (and its pepper) under `<stack.workdir>/config`, start extproc and
    a rendered Envoy; return Envoy's listen port."""
    config_dir = stack.workdir / "config"
    config_dir.mkdir()
    (config_dir / "pepper.txt").write_text(pepper, encoding="utf-8")
    config_path = config_dir / "asc.yaml"
    config_path.write_text(yaml.safe_dump(dict(config)), encoding="utf-8")
    env = dict(stack.env, **{f"{key_env_prefix}_{name.upper()}": value
                             for name, value in provider_keys.items()})
    _, extproc_port, _ = stack.start_extproc(config_path, env=env)
    listen_port, admin_socket = free_port(), stack.admin_socket()
    ports = EnvoyPorts(listen_port=listen_port, admin_socket=str(admin_socket),
                       extproc_port=extproc_port)
    stack.start_envoy(render_yaml(load_config(config_path), ports),
                      listen_port=listen_port, admin_socket=admin_socket)
    return listen_port

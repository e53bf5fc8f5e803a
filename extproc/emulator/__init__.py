"""LLM provider emulator: a deterministic, fault-injectable stand-in for real providers.

Used by demos, tests and benchmarks so the gateway can be exercised offline.  Run it
with ``python -m extproc.emulator`` (keys preferably via ``EMULATOR_KEYS``), or embed
it with :func:`make_app`.  One module per provider wire format (``openai_shape``),
one shared core (``app``).
"""

from extproc.emulator.app import EmulatorConfig, make_app

__all__ = ["EmulatorConfig", "make_app"]

"""asc-extproc: an Envoy ext_proc service that makes a mesh a multi-tenant AI gateway."""

__version__ = "0.1.0"

"""Translation between the client's API dialect and the provider's, per request.

Start at `extproc.translate.base`: the plain types, the (dialect, backend) selection
table `translator_for()`, and `front_door_for()`. One module per pair; `sse` holds the
sans-I/O SSE decoder/encoder every stream translator builds on.
"""

__all__: list[str] = []

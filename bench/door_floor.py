"""The transport floor of three ways Envoy 1.40 can ask a Python service about a request
(docs/decisions/0124-fast-path-by-ext-authz-http.md), measured in one run:

* `ext_proc`   a grpc.aio ext_proc stream of one message (json_to_metadata before it, a
               headers reply with `mode_override` that skips the rest: the 0120 design);
* `authz_grpc` a grpc.aio unary ext_authz Check with the body (`with_request_body`);
* `authz_http` ext_authz over HTTP/1.1 to an asyncio + httptools server, with the body
               (what the fast door uses).

Each server does nothing but answer with one header to set upstream, so the figures are
the floor before any gateway logic. Envoy (`--concurrency 2`) answers every request
itself (`direct_response`), so no upstream costs anything. Closed-loop wrk at c=16; CPU µs
per request of the server and of Envoy from /proc over the measured run.

    .venv/bin/python bench/door_floor.py [--duration 6] [--no-write]

Only 127.0.0.1 is contacted; every loop is bounded. Never asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Final

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/door_floor.py` puts bench/ first
    sys.path.insert(0, str(REPO_ROOT))

import common  # noqa: E402
from cpu import process_cpu_seconds  # noqa: E402
from load import run_wrk  # noqa: E402

from extproc.devstack import LOOPBACK, Stack, free_port, wait_for_port  # noqa: E402

KINDS: Final = ("ext_proc", "authz_grpc", "authz_http")
_BODY: Final = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello"}]}'
_TYPE: Final = "type.googleapis.com/envoy.extensions."


# -- the trivial servers (run as `door_floor.py --serve KIND PORT`) ----------------------

async def _serve_ext_proc(port: int) -> None:
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as modes
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    mode = modes.ProcessingMode
    skip = mode(request_body_mode=mode.NONE, response_header_mode=mode.SKIP,
                response_body_mode=mode.NONE, response_trailer_mode=mode.SKIP)
    reply = pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(response=pb.CommonResponse(
            header_mutation=pb.HeaderMutation(set_headers=[base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key="x-key", raw_value=b"sk-floor"))]))),
        mode_override=skip)

    class Servicer(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
        async def Process(self, requests: Any, context: Any) -> None:
            await context.read()
            await context.write(reply)

    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(Servicer(), server)
    server.add_insecure_port(f"{LOOPBACK}:{port}")
    await server.start()
    await server.wait_for_termination()


async def _serve_authz_grpc(port: int) -> None:
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.auth.v3 import external_auth_pb2 as pb
    from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

    reply = pb.CheckResponse(ok_response=pb.OkHttpResponse(headers=[
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="x-key",
                                                               value="sk-floor"))]))

    class Servicer(pb_grpc.AuthorizationServicer):  # type: ignore[misc]
        async def Check(self, request: Any, context: Any) -> Any:
            return reply

    server = grpc.aio.server()
    pb_grpc.add_AuthorizationServicer_to_server(Servicer(), server)
    server.add_insecure_port(f"{LOOPBACK}:{port}")
    await server.start()
    await server.wait_for_termination()


async def _serve_authz_http(port: int) -> None:
    import httptools

    reply = b"HTTP/1.1 200 OK\r\nx-key: sk-floor\r\ncontent-length: 0\r\n\r\n"

    class Check(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            self.transport.write(reply)

    server = await asyncio.get_running_loop().create_server(Check, LOOPBACK, port)
    await server.serve_forever()


_SERVERS: Final = {"ext_proc": _serve_ext_proc, "authz_grpc": _serve_authz_grpc,
                   "authz_http": _serve_authz_http}


# -- Envoy ------------------------------------------------------------------------------

def _cluster(name: str, port: int, *, http2: bool) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": LOOPBACK,
                                                         "port_value": port}}}}]}]},
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _TYPE + "upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}
    return cluster


def _filters(kind: str) -> list[dict[str, Any]]:
    authz_body = {"max_request_bytes": 1 << 20, "allow_partial_message": False}
    if kind == "ext_proc":
        return [
            {"name": "envoy.filters.http.json_to_metadata", "typed_config": {
                "@type": _TYPE + "filters.http.json_to_metadata.v3.JsonToMetadata",
                "request_rules": {"rules": [{"selectors": [{"key": "model"}], "on_present": {
                    "metadata_namespace": "asc.request", "key": "model"}}]}}},
            {"name": "envoy.filters.http.ext_proc", "typed_config": {
                "@type": _TYPE + "filters.http.ext_proc.v3.ExternalProcessor",
                "grpc_service": {"envoy_grpc": {"cluster_name": "floor"}},
                "allow_mode_override": True,
                "processing_mode": {"request_header_mode": "SEND",
                                    "response_header_mode": "SEND",
                                    "request_body_mode": "BUFFERED",
                                    "response_body_mode": "BUFFERED"},
                "metadata_options": {"forwarding_namespaces": {"untyped": ["asc.request"]}}}},
        ]
    if kind == "authz_grpc":
        return [{"name": "envoy.filters.http.ext_authz", "typed_config": {
            "@type": _TYPE + "filters.http.ext_authz.v3.ExtAuthz",
            "grpc_service": {"envoy_grpc": {"cluster_name": "floor"}},
            "transport_api_version": "V3", "clear_route_cache": True,
            "with_request_body": {**authz_body, "pack_as_bytes": True}}}]
    return [{"name": "envoy.filters.http.ext_authz", "typed_config": {
        "@type": _TYPE + "filters.http.ext_authz.v3.ExtAuthz",
        "clear_route_cache": True, "with_request_body": authz_body,
        "http_service": {
            "server_uri": {"uri": "http://floor", "cluster": "floor", "timeout": "1s"},
            "authorization_response": {"allowed_upstream_headers": {
                "patterns": [{"exact": "x-key"}]}}}}}]


def bootstrap(kind: str, *, listen_port: int, server_port: int,
              admin_socket: Path) -> dict[str, Any]:
    hcm = {
        "@type": _TYPE + "filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "floor",
        "http_filters": [*_filters(kind), {"name": "envoy.filters.http.router", "typed_config": {
            "@type": _TYPE + "filters.http.router.v3.Router"}}],
        "route_config": {"virtual_hosts": [{"name": "floor", "domains": ["*"], "routes": [{
            "match": {"prefix": "/"},
            "direct_response": {"status": 200, "body": {"inline_string": "{}"}}}]}]},
    }
    return {
        "admin": {"address": {"pipe": {"path": str(admin_socket)}}},
        "static_resources": {
            "listeners": [{"address": {"socket_address": {"address": LOOPBACK,
                                                          "port_value": listen_port}},
                           "filter_chains": [{"filters": [{
                               "name": "envoy.filters.network.http_connection_manager",
                               "typed_config": hcm}]}]}],
            "clusters": [_cluster("floor", server_port, http2=kind != "authz_http")],
        },
    }


def measure(kind: str, *, duration_s: int, warmup_s: int) -> dict[str, float]:
    with Stack(Path(tempfile.mkdtemp(prefix=f"asc-door-floor-{kind}-"))) as stack:
        server_port, listen_port = free_port(), free_port()
        server = stack.spawn(f"floor-{kind}", [sys.executable, __file__, "--serve", kind,
                                               str(server_port)])
        wait_for_port(server_port, process=server)
        admin = stack.admin_socket()
        envoy = stack.start_envoy(json.dumps(bootstrap(kind, listen_port=listen_port,
                                                       server_port=server_port,
                                                       admin_socket=admin)),
                                  listen_port=listen_port, admin_socket=admin)
        def wrk(seconds: int) -> Any:
            return run_wrk(listen_port, concurrency=16, threads=2, duration_s=seconds,
                           key="unused", path="/v1/chat/completions", body=_BODY)[0]

        wrk(warmup_s)
        pids = {"server": server.popen.pid, "envoy": envoy.popen.pid}
        before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
        result = wrk(duration_s)
        after = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
        requests = max(1, result.requests)
        return {"rps": result.rps, "errors": float(result.error_count),
                **{name: 1e6 * (after[name] - before[name]) / requests for name in pids}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        kind, port = args.serve
        asyncio.run(_SERVERS[kind](int(port)))
        return 0
    rows = []
    for kind in KINDS:
        figures = measure(kind, duration_s=args.duration, warmup_s=args.warmup)
        rows.append([kind, f"{figures['rps']:,.0f}", f"{figures['server']:,.0f}",
                     f"{figures['envoy']:,.0f}", f"{figures['errors']:.0f}"])
        print(" ".join(rows[-1]), flush=True)
    text = "\n".join([
        f"## Transport floor ({common.utc_now():%Y-%m-%d %H:%M} UTC)",
        "",
        common.machine_line(envoy=True),
        f"Command: `{common.display_command('bench/door_floor.py', sys.argv[1:])}`",
        "",
        *common.table(["kind", "rps (c=16)", "server CPU µs/req", "Envoy CPU µs/req",
                      "errors"], rows),
        "",
        "Trivial servers that only set one header; Envoy answers with `direct_response`, "
        "so these are the per-request floors of the three transports "
        "(docs/decisions/0124-fast-path-by-ext-authz-http.md).",
    ])
    print(text)
    if not args.no_write:
        common.append_section("door-floor", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

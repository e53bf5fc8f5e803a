"""The ledger's RESP pieces without a socket: command bytes, replies matched to batches in
order, error replies per command, addresses that never show a password."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis import exceptions as redis_errors

from extproc.budgets.resp import ReplyQueue, RespAddress, encode_command


def make_future() -> asyncio.Future[list[Any]]:
    return asyncio.get_running_loop().create_future()


def test_a_command_is_an_array_of_bulk_strings() -> None:
    assert encode_command(("EVALSHA", b"ab\r\n", 2, -7, "é", 0.5)) == (
        b"*6\r\n$7\r\nEVALSHA\r\n$4\r\nab\r\n\r\n$1\r\n2\r\n$2\r\n-7\r\n$2\r\n\xc3\xa9\r\n"
        b"$3\r\n0.5\r\n")


def test_an_empty_argument_keeps_its_place() -> None:
    assert encode_command(("SET", "k", "")) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n"


@pytest.mark.parametrize("bad", [True, None, ["x"]])
def test_an_argument_that_is_not_text_or_a_number_is_refused(bad: object) -> None:
    with pytest.raises(TypeError, match=r"^A tuple item must be str, int, float or bytes\.$"):
        encode_command(("SET", "k", bad))


async def test_replies_reach_their_batches_in_order_across_split_reads() -> None:
    queue = ReplyQueue()
    first, second = make_future(), make_future()
    queue.expect(2, first)
    queue.expect(1, second)
    wire = b"+OK\r\n*2\r\n:1\r\n$3\r\nabc\r\n:42\r\n"
    for index in range(0, len(wire), 3):  # Redis' bytes arrive in any slicing
        queue.feed(wire[index:index + 3])

    assert first.result() == [b"OK", [1, b"abc"]]
    assert second.result() == [42]
    assert len(queue) == 0


async def test_a_batch_stays_pending_until_its_last_reply() -> None:
    queue = ReplyQueue()
    batch = make_future()
    queue.expect(2, batch)
    queue.feed(b":1\r\n:2")
    assert not batch.done()
    queue.feed(b"\r\n")
    assert batch.result() == [1, 2]


async def test_error_replies_come_back_in_their_commands_place() -> None:
    queue = ReplyQueue()
    batch = make_future()
    queue.expect(4, batch)
    queue.feed(b":1\r\n-NOSCRIPT No matching script. Please use EVAL.\r\n"
               b"-ERR user_script:1: secret-key-name\r\n-NOAUTH Authentication required.\r\n")

    ok, noscript, error, noauth = batch.result()
    assert ok == 1
    assert type(noscript) is redis_errors.NoScriptError
    assert type(error) is redis_errors.ResponseError
    assert type(noauth) is redis_errors.AuthenticationError
    # Only the code: the rest is the server's words (a script error may quote a key).
    assert [str(e) for e in (noscript, error, noauth)] == ["NOSCRIPT", "ERR", "NOAUTH"]


async def test_a_cancelled_batch_keeps_its_place_and_the_next_gets_its_own_replies() -> None:
    queue = ReplyQueue()
    cancelled, next_batch = make_future(), make_future()
    queue.expect(2, cancelled)
    queue.expect(1, next_batch)
    cancelled.cancel()
    queue.feed(b":5\r\n:6\r\n:7\r\n")
    assert next_batch.result() == [7]


async def test_a_reply_nobody_asked_for_breaks_the_connection() -> None:
    queue = ReplyQueue()
    with pytest.raises(redis_errors.ConnectionError, match=r"^reply without a command$"):
        queue.feed(b"+OK\r\n")


async def test_bytes_that_are_not_resp_break_the_connection() -> None:
    queue = ReplyQueue()
    queue.expect(1, make_future())
    with pytest.raises(redis_errors.ConnectionError, match=r"^unparseable reply$"):
        queue.feed(b"?what\r\n")


async def test_fail_gives_every_waiting_batch_the_error() -> None:
    queue = ReplyQueue()
    first, second = make_future(), make_future()
    queue.expect(1, first)
    queue.expect(3, second)
    queue.feed(b":1\r\n")
    queue.expect(1, third := make_future())
    error = redis_errors.ConnectionError("connection lost")
    queue.fail(error)
    assert first.result() == [1]
    assert second.exception() is error
    assert third.exception() is error
    assert len(queue) == 0


def test_an_address_comes_from_the_url_and_hides_its_password() -> None:
    address = RespAddress.from_url("redis://ledger:pw-canary-1234@10.0.0.7:6380/3")
    assert address is not None
    assert (address.host, address.port, address.path, address.db, address.username) == (
        "10.0.0.7", 6380, None, 3, "ledger")
    assert "pw-canary-1234" not in repr(address)
    assert address.login_commands() == [
        encode_command(("AUTH", "ledger", "pw-canary-1234")), encode_command(("SELECT", 3))]


def test_an_address_without_login_sends_nothing_first() -> None:
    address = RespAddress.from_url("redis://127.0.0.1:6379/0")
    assert address == RespAddress(host="127.0.0.1", port=6379)
    assert address.login_commands() == []


def test_a_password_without_a_username_is_the_default_users() -> None:
    address = RespAddress.from_url("redis://:pw@127.0.0.1:6379")
    assert address is not None
    assert address.login_commands() == [encode_command(("AUTH", "pw"))]


def test_a_unix_socket_url_is_a_path() -> None:
    address = RespAddress.from_url("unix:///run/redis.sock?db=2")
    assert address is not None
    assert (address.path, address.db) == ("/run/redis.sock", 2)


def test_tls_stays_with_redis_py() -> None:
    assert RespAddress.from_url("rediss://127.0.0.1:6380/0") is None

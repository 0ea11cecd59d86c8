"""The generation path's HTTP client (core/llm/backend_http.py) against tiny asyncio servers:
keep-alive reuse, and the three ways a request fails that failover tells apart."""
import asyncio

import pytest

from tidegate.core.llm.backend_http import Cut, Lost, Pool, Unsent


async def serve(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def read_request(reader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
    return await reader.readexactly(length)


def run(coro):
    return asyncio.run(coro)


def test_answers_are_read_whole_and_the_connection_is_reused():
    async def go():
        conns = []

        async def handler(reader, writer):
            conns.append(writer)
            while True:
                try:
                    body = await read_request(reader)
                except asyncio.IncompleteReadError:
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"5\r\nhello\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        server, url = await serve(handler)
        pool = Pool(url + "/base", asyncio.get_running_loop(), keepalive=4.0, connect_timeout=2.0)
        got = []
        for i in range(3):
            r = await pool.post("/v1/x", b'{"i": %d}' % i, {"Authorization": "Bearer k"})
            got.append((r.status, await r.read()))
            r.release()
        pool.close()
        server.close()
        return got, len(conns)
    got, conns = run(go())
    assert got == [(200, b'hello{"i": %d}' % i) for i in range(3)] and conns == 1  # one connection, kept alive


def test_a_refused_connection_is_unsent():
    async def go():
        server, url = await serve(lambda r, w: None)
        server.close()
        await server.wait_closed()
        pool = Pool(url, asyncio.get_running_loop(), keepalive=4.0, connect_timeout=2.0)
        with pytest.raises(Unsent):
            await pool.post("/v1/x", b"{}", {})
    run(go())


def test_a_connection_dropped_after_the_request_is_lost():
    async def go():
        async def handler(reader, writer):
            await read_request(reader)
            writer.transport.abort()
        server, url = await serve(handler)
        pool = Pool(url, asyncio.get_running_loop(), keepalive=4.0, connect_timeout=2.0)
        with pytest.raises(Lost):
            await pool.post("/v1/x", b"{}", {})
        server.close()
    run(go())


def test_a_body_cut_mid_way_hands_out_what_came_then_cut():
    async def go():
        async def handler(reader, writer):
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\ndata: \r\n4\r\nabcd\r\n")
            await writer.drain()
            writer.close()
        server, url = await serve(handler)
        pool = Pool(url, asyncio.get_running_loop(), keepalive=4.0, connect_timeout=2.0)
        r = await pool.post("/v1/x", b"{}", {})
        got = b""
        with pytest.raises(Cut):
            while True:
                c = await r.chunk()
                assert c, "a cut body never ends cleanly"
                got += c
        r.release()
        server.close()
        return got
    assert run(go()) == b"data: abcd"

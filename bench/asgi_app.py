"""Baseline for bench/load_http.py: a bare ASGI app under uvicorn (GET answers a fixed JSON
body; POST parses the JSON body with orjson and echoes it, like tidegate's /v1/echo)."""
import orjson

OK = b'{"status":"ok"}'


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = OK
    if scope["method"] == "POST":
        chunks, more = [], True
        while more:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        body = orjson.dumps({"object": "echo", "data": orjson.loads(b"".join(chunks))})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})

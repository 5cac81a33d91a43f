#!/usr/bin/env python3
"""Print every CloudEvent a meshgate WebSocket subscription delivers, one JSON per line.

    pip install websockets
    python3 examples/ws_tail.py 'sensors/#'            # ws://127.0.0.1:8080/ws
    python3 examples/ws_tail.py 'sensors/#' ws://gw:8080/ws TOKEN
"""
import asyncio
import sys
import urllib.parse

import websockets


async def main() -> None:
    topic_filter = sys.argv[1] if len(sys.argv) > 1 else "#"
    url = sys.argv[2] if len(sys.argv) > 2 else "ws://127.0.0.1:8080/ws"
    query = {"subscribe": topic_filter}
    if len(sys.argv) > 3:
        query["access_token"] = sys.argv[3]
    # quote() keeps '/' and encodes '#' as %23; '+' is a literal wildcard for meshgate.
    qs = "&".join(f"{k}={urllib.parse.quote(v, safe='/+')}" for k, v in query.items())
    async with websockets.connect(f"{url}?{qs}", subprotocols=["cloudevents.json"]) as ws:
        async for frame in ws:
            print(frame, flush=True)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass

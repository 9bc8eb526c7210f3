"""The service's HTTP plumbing: the token and body-size guard, JSON errors, and the server-sent event streams.

Every error is a JSON body `{"error": "<one line>", "key": <the config key or request field it is about, or null>}`
with a 4xx status, so a client (a web form) shows the line beside the field it names.

A job's events stream as server-sent events (the WHATWG HTML standard's text/event-stream): each is `id: <number>`
and `data: <the event's JSON>`, oldest first, from the start of the job's history or after the number a client sends
back in `Last-Event-ID` (or `?after=N`), so a client that reconnects misses nothing and sees nothing twice. The
stream ends after the job's last event once it has ended; asked again then, it answers 204, which tells a browser's
EventSource not to reconnect.
"""
import asyncio
import hmac
import json

from gesso.serve.store import ENDED, Store

MAX_BODY = 1 << 20  # bytes: a config is a few kB
KEEP_ALIVE_S = 15.0  # a comment line on an idle stream, so proxies and clients keep it open
POLL_S = 0.1  # how often the feed looks for new events (written by the jobs' processes)


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})


def public(path: str) -> bool:
    """The page's own files (serve/page.py), which hold no data: a browser loads them before it can send a token."""
    return path == "/" or path.startswith("/static/")


class Guard:
    """ASGI middleware before every route: the token (when the server has one; the page's files are public) and the
    body size, each refused with a JSON error before the body is read into the app."""

    def __init__(self, app, token: str | None, max_body: int = MAX_BODY):
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token is not None and not public(scope["path"]):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                what = "wrong token" if given else "no token"
                return await send_json(send, 401, {"error": f"{what}: this server needs the header 'Authorization: Bearer <token>' "
                                                            "(its --token or GESSO_SERVE_TOKEN)", "key": "Authorization"},
                                       [(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await self._too_large(send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:  # a chunked body has no length to check first: read it, up to the limit
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await self._too_large(send)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        await send_json(send, 413, {"error": f"request body over {self.max_body} bytes: a job's config is a few kB",
                                    "key": "body"})


class Feed:
    """Wakes every event stream when any job has a new event: one look at the store each POLL_S for all streams."""

    def __init__(self, store: Store):
        self.store, self.version = store, 0
        self._changed = asyncio.Event()

    async def run(self) -> None:
        last = self.store.last_event()
        while True:
            await asyncio.sleep(POLL_S)
            now = self.store.last_event()
            if now != last:
                last, self.version = now, self.version + 1
                changed, self._changed = self._changed, asyncio.Event()
                changed.set()

    async def wait(self, seen: int, timeout: float) -> bool:
        """Whether an event came after version `seen` (at once if one already has), else False after `timeout`."""
        changed = self._changed
        if self.version != seen:
            return True
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


def has_more(store: Store, job: int, after: int) -> bool:
    """Whether a stream of `job` from event `after` has anything to send: events after it, or a job not yet ended."""
    return store.status(job) not in ENDED or bool(store.events_after(job, after, limit=1))


async def event_stream(store: Store, feed: Feed, job: int, after: int):
    """The job's events after number `after` as server-sent events, then each new one as it comes, until the job
    has ended and its last event is sent."""
    yield "retry: 2000\n\n"
    while True:
        seen = feed.version
        ended = store.status(job) in ENDED  # read before the events: an end's own event is then among them
        rows = store.events_after(job, after)
        for seq, data in rows:
            yield f"id: {seq}\ndata: {data}\n\n"
            after = seq
        if rows:
            continue  # there may be more than one read returns
        if ended:
            return
        if not await feed.wait(seen, KEEP_ALIVE_S):
            yield ": keep-alive\n\n"

"""The connection under the app: uvicorn's httptools protocol with a deadline to send a request
(408), a bound on its request line and headers (431), and a lingering close so that an early answer
reaches the client."""
import json
import logging

log = logging.getLogger("cnnkit.serve")  # the server's own logger: one name for all its lines

MAX_HEAD_BYTES = 64 * 1024  # request line and headers together; past it, 431 (a photo upload needs a few hundred)
LINGER_SECONDS = 3.0  # after answering and closing, how long the rest of a client's request is read and dropped


class LingeringTransport:
    """A connection's transport whose close() is a lingering close, as nginx and Apache do it.

    A server that answers before reading the whole request (a 413 for an 11 MB upload, a 408, a 401)
    and then closes with the client's bytes still arriving makes the kernel send a reset, and a reset
    discards the answer in the client's receive buffer: the client sees "connection reset", not the
    413 (seen in CI under load, when the answer lost the race with the body). So close() sends the
    answer and a FIN (shutdown of our side only), then reads and drops what the client still sends
    until it closes its side or LINGER_SECONDS pass; only then is the socket closed. The connection
    still counts against --max-connections meanwhile, so lingering is bounded like any other."""

    def __init__(self, transport, protocol):
        self._transport, self._protocol = transport, protocol
        self.lingering = False
        self._timer = None

    def __getattr__(self, name):  # everything else is the real transport's
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.lingering or self._transport.is_closing():
            return self.abort_linger()
        self.lingering = True
        try:
            self._transport.write_eof()  # after the buffered answer: FIN, our side only
        except (OSError, RuntimeError):  # already shut, or a transport that cannot half-close
            return self.abort_linger()
        self._transport.resume_reading()  # flow control may have paused it mid-body
        self._timer = self._protocol.loop.call_later(LINGER_SECONDS, self.abort_linger)

    def abort_linger(self) -> None:
        """The real close (the client closed its side, or its time is up)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport.close()


class ReadDeadline:
    """What deadline_protocol adds to uvicorn's HttpToolsProtocol (mixed in before it, so that
    super() is uvicorn's): the read deadline of read_seconds, the head bound, the lingering transport.
    A mixin, so that uvicorn is imported only when a server starts, not with this module."""
    read_seconds: float  # set by deadline_protocol
    deadline = None
    head_bytes = 0

    def arm(self, restart: bool = False) -> None:
        if restart:
            self.disarm()
        if self.deadline is None:
            self.deadline = self.loop.call_later(self.read_seconds, self.too_slow)

    def disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def busy(self) -> bool:
        """An earlier request of this connection is read and being answered (or queued behind one)."""
        cycle = self.cycle
        return bool(self.pipeline) or (cycle is not None and not cycle.more_body and not cycle.response_complete)

    def connection_made(self, transport) -> None:
        super().connection_made(LingeringTransport(transport, self))
        self.arm()

    def connection_lost(self, exc) -> None:
        self.disarm()
        if self.transport.lingering:  # a reset ends it early: cancel the timer too
            self.transport.abort_linger()
        super().connection_lost(exc)

    def eof_received(self):
        if self.transport.lingering:  # the client has sent all it will: close now
            self.transport.abort_linger()
        return super().eof_received()

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering:  # the rest of a request already answered: dropped
            return
        # Bytes between requests (a stray CRLF) start no message: the clock starts with them too,
        # or such a client would hold the connection with no timer at all.
        if not self.busy():
            self.arm()
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_bytes = 0
        self.arm(restart=not self.busy())  # each request gets the whole window from its first byte

    def on_url(self, url: bytes) -> None:
        self.count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.count_head(len(name) + len(value))
        super().on_header(name, value)

    def count_head(self, n: int) -> None:
        self.head_bytes += n
        if self.head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self.refuse(431, "Request Header Fields Too Large",
                        f"the request line and headers pass {MAX_HEAD_BYTES:,} bytes")

    def on_message_complete(self) -> None:
        self.disarm()  # all of it arrived: from here the request's own --timeout (504) applies
        super().on_message_complete()

    def too_slow(self) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        if self.busy():  # reading waits for an earlier answer (pipelining): not the client's delay
            self.arm()
            return
        self.refuse(408, "Request Timeout", f"the request was not sent within {self.read_seconds:g} s")

    def refuse(self, status: int, reason: str, detail: str) -> None:
        """Answer `status` (unless a response has begun) and close the connection."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            body = json.dumps({"detail": detail}).encode()
            self.transport.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
                                 f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
            log.info("client %s: %d (%s)", self.client, status, detail)
        if cycle is not None and not cycle.response_complete:  # the app's receive() sees a disconnect
            cycle.disconnected = True
            cycle.message_event.set()
        self.disarm()
        self.transport.close()


def deadline_protocol(seconds: float):
    """uvicorn's httptools protocol with a read deadline: a request whose headers and body have not
    all arrived `seconds` after its first byte (or after the connection opened) is answered 408 and
    its connection closed, and one whose request line and headers pass MAX_HEAD_BYTES gets 431.
    uvicorn itself bounds only idle keep-alive connections, so a client sending a byte every few
    seconds would otherwise hold a connection, and a task, for ever."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class DeadlineProtocol(ReadDeadline, HttpToolsProtocol):
        read_seconds = seconds

    return DeadlineProtocol

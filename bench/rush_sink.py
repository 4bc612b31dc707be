#!/usr/bin/python3
"""The bench's data-platform sink: a tiny asyncio HTTP/1.1 server that answers every POST
with 200 as fast as one Python process can (keep-alive, pipelining, Expect: 100-continue).
It stands in for the data-platform team's server, so the consumer's effects run for real
during a rush without the sink being the bottleneck (test/integration/fake_sink.py is the
test double with failure modes; this one only counts).

    python3 bench/rush_sink.py [--port 0]     prints "port=N" on stdout once listening

GET /_count answers {"posts": N}. Runs until SIGTERM/SIGINT or stdin EOF (parent gone).
"""
import argparse
import asyncio
import json
import os
import signal
import sys

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
posts = 0


class SinkProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""
        self.need_body = -1  # bytes of body still to skip, -1 = reading a head

    def data_received(self, data):
        global posts
        self.buf += data
        out = []
        while True:
            if self.need_body < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > 65536:
                        self.transport.close()
                    break
                head = self.buf[:end].decode("latin-1")
                self.buf = self.buf[end + 4:]
                lines = head.split("\r\n")
                method, _, rest = lines[0].partition(" ")
                path = rest.partition(" ")[0]
                length, expect = 0, False
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    name = name.strip().lower()
                    if name == "content-length":
                        length = int(value.strip() or 0)
                    elif name == "expect" and value.strip().lower() == "100-continue":
                        expect = True
                if expect and len(self.buf) < length:
                    self.transport.write(CONTINUE)
                self.need_body = length
                self.method, self.path = method, path
            if len(self.buf) < self.need_body:
                break
            self.buf = self.buf[self.need_body:]
            self.need_body = -1
            if self.method == "GET" and self.path == "/_count":
                body = json.dumps({"posts": posts}).encode()
                out.append(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            else:
                posts += 1
                out.append(OK)
        if out:
            self.transport.write(b"".join(out))


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SinkProtocol, "127.0.0.1", args.port, backlog=1024)
    print(f"port={server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if not sys.stdin.isatty():
        # EOF on stdin = the bench went away: stop with it.
        def on_stdin():
            try:
                data = os.read(sys.stdin.fileno(), 4096)
            except OSError:
                data = b""
            if not data:
                stop.set()
        try:
            loop.add_reader(sys.stdin.fileno(), on_stdin)
        except (PermissionError, ValueError, OSError):
            pass  # stdin is a regular file or /dev/null: signals only
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(main())

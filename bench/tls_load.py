"""A STARTTLS load generator (smtp-source speaks no TLS).

    python tls_load.py PORT CAFILE|- MAILS SESSIONS SIZE keep|new

One process, uvloop, SESSIONS sessions at once; each session connects,
says EHLO, STARTTLS, verifies the server's certificate against CAFILE,
EHLO again, then sends 1 KiB-ish mails (MAIL, RCPT, DATA, one command at a
time, as smtp-source does) until MAILS are sent in all: one mail per
connection (``new``) or as many as it can on one (``keep``). The benchmark
starts a few of these at once; each waits for a line on stdin before it
starts, so imports are not timed, then prints one JSON line: mails sent,
its first and last moment (time.monotonic, comparable across processes on
Linux) and the CPU it used (user, system), so the report can show the
client was not the bottleneck.
"""

import asyncio
import json
import resource
import ssl
import sys
import time

import uvloop


class Refused(Exception):
    pass


async def reply(reader: asyncio.StreamReader, want: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line:
            raise Refused(f"connection closed, wanted {want!r}")
        if line[3:4] != b"-":
            if not line.startswith(want):
                raise Refused(f"wanted {want!r}, got {line!r}")
            return


class Load:
    def __init__(self, port: int, context: ssl.SSLContext | None, mails: int, keep: bool, size: int) -> None:
        self.port = port
        self.context = context
        self.left = mails
        self.keep = keep
        self.sent = 0
        self.versions: set[str] = set()  # TLS versions negotiated
        line = b"x" * 78 + b"\r\n"
        self.message = (b"From: a@smtpd.com\r\nTo: b@smtpd.com\r\nSubject: load\r\n\r\n"
                        + line * max(size // len(line), 1) + b".\r\n")

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True

    async def session(self) -> None:
        while self.take():
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            try:
                await reply(reader, b"220")
                writer.write(b"EHLO load.example\r\n")
                await reply(reader, b"250")
                if self.context is not None:
                    writer.write(b"STARTTLS\r\n")
                    await reply(reader, b"220")
                    await writer.start_tls(self.context, server_hostname="localhost")
                    self.versions.add(writer.get_extra_info("ssl_object").version())
                    writer.write(b"EHLO load.example\r\n")
                    await reply(reader, b"250")
                while True:
                    writer.write(b"MAIL FROM:<a@smtpd.com>\r\n")
                    await reply(reader, b"250")
                    writer.write(b"RCPT TO:<b@smtpd.com>\r\n")
                    await reply(reader, b"250")
                    writer.write(b"DATA\r\n")
                    await reply(reader, b"354")
                    writer.write(self.message)
                    await reply(reader, b"250")
                    self.sent += 1
                    if not (self.keep and self.take()):
                        break
                writer.write(b"QUIT\r\n")
                await reply(reader, b"221")
            finally:
                writer.close()


async def main() -> None:
    port, cafile, mails, sessions, size, mode = sys.argv[1:7]
    # CAFILE "-": no STARTTLS, to check the generator itself against smtp-source.
    context = None if cafile == "-" else ssl.create_default_context(cafile=cafile)
    load = Load(int(port), context, int(mails), mode == "keep", int(size))
    sys.stdin.readline()  # go
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    start = time.monotonic()
    await asyncio.gather(*(load.session() for _ in range(int(sessions))))
    end = time.monotonic()
    done = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"sent": load.sent, "start": start, "end": end,
                      "user": done.ru_utime - cpu.ru_utime, "system": done.ru_stime - cpu.ru_stime,
                      "tls": sorted(load.versions)}), flush=True)


if __name__ == "__main__":
    uvloop.run(main())

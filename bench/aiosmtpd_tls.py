"""aiosmtpd with its own STARTTLS support, for the benchmark's TLS scenarios.

    python aiosmtpd_tls.py PORT CERT KEY MAILDIR

The ``python -m aiosmtpd`` command has no TLS options, so this starts the
same server through aiosmtpd's documented API: ``Controller`` with the
``SMTP`` parameters ``tls_context`` and ``require_starttls=True`` (MAIL
before STARTTLS is refused, as prefork-smtpd's ``--require-tls``), and the
``Mailbox`` handler writing into MAILDIR (the same job as the plain-text
aiosmtpd-Mailbox contender). Runs until SIGTERM.
"""

import signal
import ssl
import sys
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Mailbox


def main() -> None:
    port, cert, key, maildir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    controller = Controller(Mailbox(maildir), hostname="127.0.0.1", port=port, ready_timeout=30,
                            tls_context=context, require_starttls=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    controller.start()
    stop.wait()
    controller.stop()


if __name__ == "__main__":
    main()

"""A real SMTP server for the alerting rig test (aiosmtpd): STARTTLS + AUTH required.

    python3 smtp_sink.py CERT KEY USER PASSWORD OUTDIR     (listens on 0.0.0.0:587)

Each accepted message is written to OUTDIR/mail-<n>.json with the envelope,
the authenticated user, whether the session was TLS, and the message text.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import ssl
import sys

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

CERT, KEY, USER, PASSWORD, OUT = sys.argv[1:6]
COUNTER = itertools.count(1)


class Handler:
    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd API)
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "auth_user": (session.authenticated and USER) or None,
            "tls": session.ssl is not None,
            "content": envelope.content.decode("utf-8", "replace"),
        }
        path = os.path.join(OUT, f"mail-{next(COUNTER)}.json")
        with open(path + ".tmp", "w") as fh:
            json.dump(record, fh)
        os.rename(path + ".tmp", path)
        return "250 Message accepted"


def authenticator(server, session, envelope, mechanism, auth_data):
    ok = (isinstance(auth_data, LoginPassword) and auth_data.login.decode() == USER
          and auth_data.password.decode() == PASSWORD)
    return AuthResult(success=ok)


def main() -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(CERT, KEY)
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(
        lambda: SMTP(Handler(), hostname="smtp-sink", tls_context=ctx, require_starttls=True,
                     auth_required=True, auth_require_tls=True, authenticator=authenticator,
                     # aiosmtpd's LOGIN challenge ("User Name") is not the
                     # "Username:" Go's client expects; PLAIN is what mail
                     # providers offer anyway.
                     auth_exclude_mechanism=["LOGIN"]),
        host="0.0.0.0", port=587))
    print("smtp-sink: listening on 0.0.0.0:587", flush=True)
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == "__main__":
    main()

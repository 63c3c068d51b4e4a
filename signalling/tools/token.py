"""
``signalling-token``: mint a token for a server started with
``--auth-secret FILE``, signed with the first secret of the same file.

    signalling-token --secret-file FILE [--uid UID] [--role ROLE ...]
        [--room ROOM ...] [--call UID ...] [--ttl SECONDS]

Prints the token; give it to a client as ``?token=`` on the WebSocket URL
(``wss://host:8443/?token=...``, the page at ``/?token=...``) or as
``Authorization: Bearer ...``.
"""

import argparse
import sys

from signalling.server.auth import AuthConfigError, mint, read_secrets

ROLES = ("producer", "consumer", "listener")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="signalling-token",
        description="Mint a token for a signalling server started with --auth-secret FILE.",
    )
    parser.add_argument("--secret-file", required=True, metavar="FILE",
                        help="the server's --auth-secret file (its first secret signs)")
    parser.add_argument("--uid", help="the only uid the token may register with HELLO")
    parser.add_argument("--role", action="append", choices=ROLES,
                        help="a role of the JSON dialect the token may take (repeatable)")
    parser.add_argument("--room", action="append", metavar="ROOM_ID",
                        help="a room the token may join (repeatable; default: any)")
    parser.add_argument("--call", action="append", metavar="UID",
                        help="a uid the token may call (repeatable; default: any)")
    parser.add_argument("--ttl", type=int, default=3600, metavar="SECONDS",
                        help="seconds the token stays valid, and its connections "
                        "open; a server refuses tokens for longer than its "
                        "--max-token-lifetime, a day by default (default: %(default)s)")
    return parser


def main(argv=None):
    options = build_parser().parse_args(argv)
    if options.ttl <= 0:
        print("signalling-token: --ttl must be positive", file=sys.stderr)
        raise SystemExit(2)
    try:
        secret = read_secrets(options.secret_file)[0]
    except AuthConfigError as e:
        print(f"signalling-token: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(mint(secret, options.ttl, options.uid, options.role, options.room, options.call))


if __name__ == "__main__":
    main()

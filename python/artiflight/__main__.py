"""`python -m artiflight [URI]`: a short status of a server (reachable, what it holds)."""

from __future__ import annotations

import argparse
import sys

from . import connect
from ._errors import ArtiflightError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m artiflight", description=__doc__)
    parser.add_argument("uri", nargs="?", help="the server (default: ARTIFLIGHT_SERVER, then grpc://127.0.0.1:8815)")
    parser.add_argument("--token", help="a token (default: ARTIFLIGHT_TOKEN)")
    args = parser.parse_args(argv)
    try:
        client = connect(args.uri, token=args.token)
        status = client.status()
    except (ArtiflightError, OSError) as error:
        print(f"artiflight: cannot reach the server: {error}", file=sys.stderr)
        return 1
    print(f"server: {status['server']}")
    print(f"artifacts: {status['artifacts']}, collections: {status['collections']}")
    for key in status["keys"][:20]:
        print(f"  {key}")
    if len(status["keys"]) > 20:
        print(f"  ... and {len(status['keys']) - 20} more")
    return 0


if __name__ == "__main__":
    sys.exit(main())

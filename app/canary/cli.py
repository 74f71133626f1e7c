"""`mmserve canary status|set|rollback`: the admin API from a shell, against a running server.

    mmserve canary status [NAME]                   --url http://127.0.0.1:8000 --key $KEY
    mmserve canary set NAME --weight 0.2 [--mode split|shadow]
    mmserve canary rollback NAME [--reason "bad answers"]

The key comes from --key or $MMSERVE_API_KEY (it needs the admin scope). Prints the server's JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import httpx


def add_canary_parser(sub: argparse._SubParsersAction) -> None:
    canary = sub.add_parser("canary", help="a model's canary version: status, weight, rollback (admin API)")
    commands = canary.add_subparsers(dest="canary_command", required=True)

    def common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--url", default=os.environ.get("MMSERVE_URL", "http://127.0.0.1:8000"),
                            help="the server (default $MMSERVE_URL or http://127.0.0.1:8000)")
        parser.add_argument("--key", default=None, help="an API key with the admin scope (default $MMSERVE_API_KEY)")
        parser.set_defaults(func=cmd_canary)
        return parser

    status = common(commands.add_parser("status", help="every canary, or one model's"))
    status.add_argument("name", nargs="?", default=None, metavar="NAME")
    update = common(commands.add_parser("set", help="set the canary's weight and/or mode, at once"))
    update.add_argument("name", metavar="NAME")
    update.add_argument("--weight", type=float, default=None, help="the canary's share, 0..1")
    update.add_argument("--mode", choices=("split", "shadow"), default=None)
    rollback = common(commands.add_parser("rollback", help="weight 0 at once (requests in flight finish)"))
    rollback.add_argument("name", metavar="NAME")
    rollback.add_argument("--reason", default="", help="recorded in the audit log")


def canary_request(client: httpx.Client, args: argparse.Namespace) -> httpx.Response:
    """The admin call a parsed `mmserve canary ...` makes (the client carries the URL and the key)."""
    if args.canary_command == "status":
        path = f"/v1/admin/models/{args.name}/canary" if args.name else "/v1/admin/canaries"
        return client.get(path)
    if args.canary_command == "set":
        change = {k: v for k, v in (("weight", args.weight), ("mode", args.mode)) if v is not None}
        return client.put(f"/v1/admin/models/{args.name}/canary", json=change)
    return client.post(f"/v1/admin/models/{args.name}/rollback", json={"reason": args.reason})


def cmd_canary(args: argparse.Namespace) -> int:
    key = args.key or os.environ.get("MMSERVE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with httpx.Client(base_url=args.url, headers=headers, timeout=30) as client:
            response = canary_request(client, args)
    except httpx.HTTPError as e:
        print(f"mmserve: error: {args.url}: {e}", file=sys.stderr)
        return 2
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"message": response.text}}
    if response.is_error:
        print(f"mmserve: error: HTTP {response.status_code}: {body.get('error', {}).get('message', body)}",
              file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2))
    return 0

"""Start the studio's web UI: `python launch.py [--host] [--port] [--workspace] [--base] [--auth USER:PASS]`."""

import argparse
import sys

from studio.cli import add_ui_arguments


def main() -> int:
    """Parse the server flags and serve the UI."""
    parser = argparse.ArgumentParser(description="LoRA style studio web UI")
    add_ui_arguments(parser)
    args = parser.parse_args()
    from studio.ui.app import launch, parse_auth

    try:
        parse_auth(args.auth)
    except ValueError as exc:
        parser.error(str(exc))
    launch(
        host=args.host,
        port=args.port,
        workspace=args.workspace,
        base=args.base,
        auth=args.auth,
        share=args.share,
        max_upload_mb=args.max_upload_mb,
        queue_size=args.queue_size,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

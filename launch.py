"""Start the studio's web UI: `python launch.py [--host] [--port] [--workspace] [--base] [--auth USER:PASS]`."""

import argparse
import sys

from studio.cli import add_ui_arguments, run_ui


def main() -> int:
    """Parse the server flags and serve the UI."""
    parser = argparse.ArgumentParser(description="LoRA style studio web UI")
    add_ui_arguments(parser)
    args = parser.parse_args()
    try:
        return run_ui(args)
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())

"""Hugging Face Spaces entry point (the Space's app_file).

Spaces route traffic to port 7860 inside the container, so this binds
0.0.0.0 there; everything else comes from settings.toml and SPECCHAT_*
variables set in the Space's settings.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chatapp.cli import main  # noqa: E402


def space_args() -> list[str]:
    return ["serve", "--host", "0.0.0.0", "--port", os.environ.get("PORT", "7860"), "--no-browser"]


if __name__ == "__main__":
    sys.exit(main(space_args()))

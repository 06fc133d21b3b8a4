"""The frozen bundle's entry point: `specchat`, with the embedded model's GGUF file carried in the bundle.

PyInstaller freezes this script (packaging/desktop/specchat.spec). The bundle has no pip to fetch the
embedded model with, so it points $SPECCHAT_EMBEDDED_WHEEL at the GGUF file it carries (the user's own
setting wins); the first start converts it into the user's cache, with the steps shown in the window.
"""

import os
import sys
from pathlib import Path

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> int:
    bundled = Path(getattr(sys, "_MEIPASS", Path(__file__).parent)) / "embedded" / EMBEDDED_GGUF
    if bundled.is_file():
        os.environ.setdefault("SPECCHAT_EMBEDDED_WHEEL", str(bundled))
    from chatapp.cli import main as specchat

    return specchat()


if __name__ == "__main__":
    sys.exit(main())

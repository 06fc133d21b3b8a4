"""Entry point: `python main.py` runs the chat UI; see `python main.py --help`."""

import sys

from chatapp.cli import main

if __name__ == "__main__":
    sys.exit(main())

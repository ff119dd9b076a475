"""``python -m device``: the ``edgeseal-device`` command line."""

from __future__ import annotations

from device.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m provisioning``: the same as the ``edgeseal-provision`` console script."""

from provisioning.cli import main

main()

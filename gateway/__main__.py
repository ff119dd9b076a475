"""``python -m gateway``: the ``edgeseal-gateway`` command line."""

from gateway.cli import main

if __name__ == "__main__":
    main()

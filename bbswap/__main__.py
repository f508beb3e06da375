"""``python -m bbswap``."""

from bbswap.cli.app import main

main()

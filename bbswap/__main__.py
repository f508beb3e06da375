"""``python -m bbswap``."""

from bbswap.cli import main

main()

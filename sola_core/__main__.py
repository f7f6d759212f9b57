"""`python -m sola_core` is the `sola` command."""
from .cli import main

main()

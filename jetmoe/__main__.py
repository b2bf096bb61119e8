"""`python -m jetmoe ...` is the `jetmoe` command."""

from .cli import console_main

console_main()

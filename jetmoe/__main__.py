"""`python -m jetmoe ...` is the `jetmoe` command."""

from .command import console_main

console_main()

"""Command-line tools: `python -m tml.tools.<name>`."""

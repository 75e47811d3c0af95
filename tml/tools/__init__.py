"""Command-line tools: `python -m tml.tools.<name>` for plan, plot, export, model_card."""

"""Command-line tools over run dirs and checkpoints: plot, export, model_card."""

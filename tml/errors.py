"""Errors every layer of tml raises, in a module every layer can import (it imports nothing)."""


class ConfigError(ValueError):
    """A configuration value is impossible. The message names the key and the fix."""

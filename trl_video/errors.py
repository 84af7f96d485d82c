"""One exception type for user-facing problems: the CLI prints its message as one line and exits 2."""


class TrlVideoError(Exception):
    """A problem with the user's input (recipe, files, plugins, data). The message names the culprit."""


class PluginError(TrlVideoError):
    """A plugin failed to load, registered a duplicate name, or a named component is missing."""


class ConfigError(TrlVideoError, ValueError):
    """A config value is missing, unknown, of the wrong type or out of range; ``key`` is the key at fault
    (``method_args.<name>`` for a method's config)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key

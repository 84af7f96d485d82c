"""The plugin's error type: a ``TrlVideoError`` (the CLI prints it as one ``error:`` line, exit 2)."""

from trl_video.errors import TrlVideoError


class RewardForcingError(TrlVideoError):
    """A reward-forcing configuration or usage error."""

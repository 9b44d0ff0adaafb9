"""Errors that reach users. Every message names the input and says what is wrong.

The command line turns any :class:`AudioclfError` into one line on stderr and exit
status 2; library users catch the specific class (all are ``ValueError``).
"""

__all__ = ["AudioclfError", "AudioError", "ManifestError", "BundleError", "ConfigError"]


class AudioclfError(ValueError):
    """Base class of every error caused by the user's input (files, manifests, options)."""


class AudioError(AudioclfError):
    """An audio file cannot be read, or its content is unusable."""


class ManifestError(AudioclfError):
    """A manifest (or a dataset layout it is built from) is invalid.

    ``problems`` holds every problem found, one string each, so a user can fix them
    all in one go instead of one per run.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            shown = self.problems[:20]
            more = len(self.problems) - len(shown)
            message = message + "\n" + "\n".join(f"  {p}" for p in shown)
            if more:
                message += f"\n  ... and {more} more"
        super().__init__(message)


class BundleError(AudioclfError):
    """A model bundle or checkpoint is missing, incomplete, or from an incompatible version."""


class ConfigError(AudioclfError):
    """An option or configuration value is out of range or inconsistent."""

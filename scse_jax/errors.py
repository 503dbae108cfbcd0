"""The package's own exception types: every error raised on purpose is one of these."""


class ScseError(Exception):
    """Base class of every error the package raises on purpose."""


class DataError(ScseError):
    """A data file or folder is missing, malformed, too large or inconsistent."""


class ConfigError(ScseError, ValueError):
    """A configuration value is invalid (also a ValueError, as Python's own checks raise)."""


class CheckpointError(ScseError):
    """A checkpoint is missing, corrupt or does not match the configuration."""


class TrainingError(ScseError):
    """Training cannot go on (for example a non-finite loss)."""


class RunStopped(ScseError):
    """A run stopped on SIGTERM/SIGINT after saving a checkpoint: resumable, not finished."""


class OutputError(ScseError):
    """A file cannot be written (full disk, no permission, a folder in its place); what was
    there before is kept."""

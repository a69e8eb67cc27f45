"""The errors a run reports in one line, and the exit codes a script or scheduler can tell apart."""

from __future__ import annotations

EXIT_CONFIG, EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_STORAGE = 2, 3, 4, 5


class ConfigError(ValueError):
    """A config value (or input) that cannot work; the message is one line naming the key."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")

    def under(self, prefix: str) -> "ConfigError":
        """The same error, its key placed under `prefix` (a pipeline's stage: pipeline.stages.<name>)."""
        return ConfigError(f"{prefix}.{self.key}", self.message)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before a broken checkpoint was written."""


class PreemptedError(RuntimeError):
    """The job was told to stop (SIGUSR1) and saved last.ckpt; rerunning the same command resumes it."""


class StorageError(RuntimeError):
    """A file could not be written (permission, disk full, read-only): the message names the path and the cause."""

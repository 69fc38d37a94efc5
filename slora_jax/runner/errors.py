"""The errors a user can cause and fix; entry points print them as one line."""

from slora_jax.runner.checkpoint import ConfigMismatchError
from slora_jax.runner.config import ConfigError
from slora_jax.runner.checkpoint import WorkdirError
from slora_jax.runner.data.sources import DataError
from slora_jax.models.convert import CheckpointMismatchError
from slora_jax.models.convert import UnreadableCheckpointError
from slora_jax.runner.hub import HubError


class NonFiniteLossError(FloatingPointError):
  """The training loss (or the trained parameters) became NaN or infinite."""


USER_ERRORS = (ConfigError, DataError, ConfigMismatchError, CheckpointMismatchError,
               UnreadableCheckpointError, HubError, NonFiniteLossError,
               WorkdirError, FileNotFoundError)

__all__ = ["ConfigError", "ConfigMismatchError", "DataError", "CheckpointMismatchError",
           "UnreadableCheckpointError", "HubError", "NonFiniteLossError",
           "WorkdirError", "USER_ERRORS"]

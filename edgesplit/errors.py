"""User-facing errors. Each message says what was expected and what was given."""


class EdgesplitError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback."""


class ModelError(EdgesplitError):
    """The ONNX model cannot be loaded, checked or shape-inferred."""


class ClusterError(EdgesplitError):
    """The cluster description is incomplete or impossible."""


class MappingError(EdgesplitError):
    """A user mapping does not fit the model or the cluster."""


class PlacementError(EdgesplitError):
    """No placement satisfies the devices' budgets."""


class PlanError(EdgesplitError):
    """A plan directory is invalid, stale or tampered with."""


class InputError(EdgesplitError):
    """Run inputs do not match the model's declared inputs."""


class OutputError(EdgesplitError):
    """An output path cannot be written without losing a file: a directory, a missing folder, a plan's own file."""


class EdgesplitWarning(UserWarning):
    """Something in the user's input is suspect but usable; the CLI prints it as one line."""


class InputWarning(EdgesplitWarning):
    """Run inputs that will compute, but probably not what was meant (NaN or Inf values, ignored files)."""


class DeviceFailedError(EdgesplitError):
    """A request needs a stage on a device in the failure set and no fallback exists."""

    def __init__(self, device: str, stage: str, message: str | None = None) -> None:
        self.device = device
        self.stage = stage
        super().__init__(message or f"device {device!r} is down and stage {stage!r} has no replica or fallback")


class StageError(EdgesplitError):
    """A stage raised an error on a live device while answering a request (not a device failure)."""

    def __init__(self, device: str, stage: str, request: int, message: str) -> None:
        self.device, self.stage, self.request = device, stage, request
        super().__init__(f"request {request}: stage {stage!r} on device {device!r} failed: {message}")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """What a library's exception says, in one line (its type when it says nothing)."""
    text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0]
    return line if len(line) <= limit else line[:limit] + "..."


def listing(names: list[str], limit: int = 8) -> str:
    """The first `limit` names, and how many more there are."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")

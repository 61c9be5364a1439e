"""The errors mojollm raises for bad input or an unusable setup. The CLI prints them as one line."""


class MojollmError(Exception):
    """Base class: a user-facing error whose message is a complete sentence."""


class KernelBuildError(MojollmError):
    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details  # the compiler's full output, for --verbose


class BackendUnavailable(MojollmError):
    pass


class ModelLoadError(MojollmError):
    pass


class RequestFailed(MojollmError):
    """A request that was accepted failed while it ran (its message says why); others go on."""

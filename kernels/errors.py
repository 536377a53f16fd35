"""The kernels' own error type, so that kernels/ needs nothing from grokfast/."""


class KernelConfigError(ValueError):
    """Input the fused kernels or their steppers cannot take (a model beyond their limits, models that
    cannot share a launch, a checkpoint of another filter): the message is one line saying what to
    change. grokfast's command line reports it like its own ConfigError (exit status 2)."""

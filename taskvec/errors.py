class TaskVecError(Exception):
    """Bad input or a refused operation. The message is one line naming the file (and tensor)."""


class InterruptedAfterWrite(KeyboardInterrupt):
    """A signal arrived after the output was complete and in place, while the previous one was
    being removed: the run's work is done; only its cleanup was cut short."""

    def __init__(self, out):
        super().__init__(str(out))
        self.out = out

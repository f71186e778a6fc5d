# Names in messages come from files (tensor names, JSON keys, paths): their control characters
# are escaped so that a message stays one line and cannot drive the terminal.
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]} | {0x0A: "\\n", 0x0D: "\\r"}


class TaskVecError(Exception):
    """Bad input or a refused operation. The message is one line naming the file (and tensor)."""

    def __init__(self, message: str):
        super().__init__(str(message).translate(_ESCAPES))


class InterruptedAfterWrite(KeyboardInterrupt):
    """A signal arrived after the output was complete and in place, while the previous one was
    being removed: the run's work is done; only its cleanup was cut short."""

    def __init__(self, out):
        super().__init__(str(out))
        self.out = out


def interrupt_handled() -> None:
    """Call where a CLI has handled Ctrl-C and will exit 130. A KeyboardInterrupt raised while
    C code runs Python through PyRun_String (as pybind11's py::exec does) sets CPython's sticky
    "unhandled KeyboardInterrupt" flag even when Python code catches it later, and CPython then
    ends the process by SIGINT instead of with our status (seen in 6 of 60 `sku unlearn` runs
    interrupted in their first seconds; 0 of 60 with this). Running any code through that API
    clears the flag."""
    import ctypes

    ctypes.pythonapi.PyRun_SimpleString(b"pass")

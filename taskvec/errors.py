class TaskVecError(Exception):
    """Bad input or a refused operation. The message is one line naming the file (and tensor)."""

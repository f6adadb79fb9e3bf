"""The one line of an error from a library below us (Orbax, TensorStore), for our own messages."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, without the spec TensorStore may append (a page
    of JSON); its type's name for an empty message."""
    text = str(error).strip()
    return text.splitlines()[0].split(" [tensorstore_spec=")[0] if text else type(error).__name__

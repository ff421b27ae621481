"""containerd's label rules (``pkg/labels``), shared by content, snapshots, leases and diffs.

A label's key must be a non-empty string, its value a string, and the key and value together
at most :data:`MAX_LABEL_SIZE` bytes of UTF-8. Stores drop labels whose value is empty
(``boltutil.WriteLabels``): :func:`stored_labels`.
"""

from __future__ import annotations

from collections.abc import Mapping

from ._errors import InvalidError

__all__ = ["MAX_LABEL_SIZE", "check_label_size", "stored_labels", "validate_labels"]

#: containerd ``pkg/labels``: a label's key plus value may hold at most this many bytes.
MAX_LABEL_SIZE = 4096


def check_label_size(key: str, value: str, *, what: str) -> None:
    """Checks one label's size.

    Raises:
        InvalidError: Key and value take more than :data:`MAX_LABEL_SIZE` bytes.
    """
    size = len(key.encode("utf-8", "surrogatepass")) + len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_LABEL_SIZE:
        msg = (
            f"label key and value of {what} are {size} bytes, more than the maximum "
            f"{MAX_LABEL_SIZE}; key: {key[:64]!r}"
        )
        raise InvalidError(msg)


def validate_labels(labels: object, *, what: str) -> dict[str, str]:
    """Checks labels as containerd does (``pkg/labels.Validate``) and returns a plain copy.

    Args:
        labels: A mapping, or ``None`` for no labels.
        what: Names the object in error messages.

    Returns:
        The labels, empty values included (a caller updating labels deletes with them).

    Raises:
        InvalidError: Naming the offending key.
    """
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        msg = f"labels of {what} must be a mapping, got {type(labels).__name__}"
        raise InvalidError(msg)
    result: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            msg = f"label {key!r}={value!r} of {what}: keys and values must be strings"
            raise InvalidError(msg)
        if not key:
            msg = f"label of {what} has an empty key"
            raise InvalidError(msg)
        check_label_size(key, value, what=what)
        result[key] = value
    return result


def stored_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """The labels a store keeps: those with a non-empty value."""
    return {k: v for k, v in labels.items() if v}

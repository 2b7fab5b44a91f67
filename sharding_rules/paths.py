"""Pytree paths as strings: ``{"params": {"mlp": {"kernel": x}}}`` -> ``"params/mlp/kernel"``.

Every module in this package names a leaf by this one string, so overrides, plans and
optimizer-state matching all agree on it. A ``flax.nnx`` state wraps each array in a
``Variable`` whose path ends with the attribute ``.value``; that last step is dropped, so an
NNX parameter reads ``"layers/attn/q/kernel"`` like its linen twin and an override written
for one (``"q/kernel$"``) matches the other.
"""

from typing import Any

import jax
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey


def key_str(key: Any) -> str:
    """One path entry as text: a dict key, attribute name or sequence index."""
    if isinstance(key, DictKey):
        return str(key.key)
    if isinstance(key, GetAttrKey):
        return key.name
    if isinstance(key, SequenceKey):
        return str(key.idx)
    if isinstance(key, FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_keys(key_path: tuple[Any, ...]) -> tuple[str, ...]:
    """A jax key path as a tuple of strings, without an NNX ``Variable``'s final ``.value``."""
    if key_path and isinstance(key_path[-1], GetAttrKey) and key_path[-1].name == "value":
        key_path = key_path[:-1]
    return tuple(key_str(k) for k in key_path)


def leaves_with_paths(tree: Any) -> tuple[list[str], list[Any], Any]:
    """Flatten ``tree``: (``"a/b/c"`` path per leaf, leaves, treedef), in ``jax.tree`` order."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = ["/".join(path_keys(kp)) for kp, _ in flat]
    return paths, [leaf for _, leaf in flat], treedef

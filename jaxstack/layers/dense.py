"""The weight matmul of every Dense layer, with a backward pass laid out for the CPU.

``dense_dot_general`` is a drop-in ``dot_general`` for flax's ``Dense`` / ``DenseGeneral``
(their ``dot_general`` field): ``x: [..., *in] @ w: [*in, *out] -> [..., *out]``. Its values
and gradients are those of ``lax.dot_general``; only the form of the weight gradient differs.
Autodiff writes it as ``dot_general(g, x)`` over the token dims followed by a transpose, which
XLA:CPU turns into transposed copies of the activations (for the SwiGLU block, a strided copy
of the SiLU-backward product per layer). Here it is one 2-D matmul, the way one writes it by
hand::

    dw = x.reshape(t, k).T @ g.reshape(t, n)       t tokens, k = prod(in), n = prod(out)

which XLA compiles with no copy. Other contractions (batch dims, inner axes) fall through to
``lax.dot_general`` unchanged.
"""

import functools
import math

import jax
from jax import lax


def dense_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: lax.DotDimensionNumbers,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jax.typing.DTypeLike | None = None,
) -> jax.Array:
    """``lax.dot_general`` with the weight gradient as one token-contracting matmul.

    Takes the fast path when ``dimension_numbers`` contract the trailing ``n`` dims of ``lhs``
    (an activation ``[..., *in]``) with the leading ``n`` dims of ``rhs`` (a kernel
    ``[*in, *out]``) in order, without batch dims: what ``nn.Dense`` and ``nn.DenseGeneral``
    without ``batch_dims`` pass.
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    n = len(lhs_contract)
    trailing = tuple(lhs_contract) == tuple(range(lhs.ndim - n, lhs.ndim))
    if lhs_batch or rhs_batch or not trailing or tuple(rhs_contract) != tuple(range(n)):
        return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    return _dense(lhs, rhs, n, precision, preferred_element_type)


def _contract_trailing(x, w, n, precision, preferred_element_type):
    """x: [..., *in] . w: [*in, *out] over the ``n`` ``in`` dims."""
    dims = ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ()))
    return lax.dot_general(x, w, dims, precision, preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dense(x, w, n, precision, preferred_element_type):
    return _contract_trailing(x, w, n, precision, preferred_element_type)


def _dense_fwd(x, w, n, precision, preferred_element_type):
    return _contract_trailing(x, w, n, precision, preferred_element_type), (x, w)


def _dense_bwd(n, precision, preferred_element_type, residuals, g):
    """dx = g . w over the ``out`` dims; dw = x_2d.T @ g_2d over the tokens (module doc).
    Each is computed as autodiff would (same precision and accumulation type) and returned
    in its operand's dtype."""
    x, w = residuals
    out_dims = tuple(range(g.ndim - (w.ndim - n), g.ndim))
    dx = lax.dot_general(
        g, w, ((out_dims, tuple(range(n, w.ndim))), ((), ())), precision, preferred_element_type
    )
    k = math.prod(w.shape[:n])
    x2, g2 = x.reshape(-1, k), g.reshape(-1, math.prod(w.shape[n:]))
    dw = lax.dot_general(x2, g2, (((0,), (0,)), ((), ())), precision, preferred_element_type)
    return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)

"""The one layout rule between Hugging Face tensors and jaxstack parameters (see ``HFTensor``).

HF ``nn.Linear`` weights are ``[out, in]``; jaxstack kernels are ``[*in, *out]`` with the
input on the first ``in_axes`` axes (3-D attention kernels split heads from head_dim). Other
tensors (embeddings, norms, biases) only change shape. Both directions use only reshape and
transpose, so on numpy they are views: no host copy.
"""


def hf_to_jax(x, shape: tuple[int, ...], in_axes: int):
    """An HF tensor (numpy or jax) as a jaxstack parameter of ``shape``."""
    if in_axes == 0:
        return x.reshape(shape)
    in_shape, out_shape = shape[:in_axes], shape[in_axes:]
    x = x.reshape(*out_shape, *in_shape)
    n_out = len(out_shape)
    return x.transpose(*range(n_out, x.ndim), *range(n_out))


def jax_to_hf(x, hf_shape: tuple[int, ...], in_axes: int):
    """A jaxstack parameter (numpy or jax) as the HF tensor of ``hf_shape``."""
    if in_axes:
        x = x.transpose(*range(in_axes, x.ndim), *range(in_axes))
    return x.reshape(hf_shape)

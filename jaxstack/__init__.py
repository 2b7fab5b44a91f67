"""jaxstack: distributed training and inference of LLMs from three user functions."""

"""Triton backend (being written; reports itself unavailable until then)."""


def unavailable_reason(device):
    return "the Triton backend is not implemented yet"

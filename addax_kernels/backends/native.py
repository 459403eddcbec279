"""Native backend (being written; reports itself unavailable until then)."""


def unavailable_reason(device):
    return "the native extension is not implemented yet"

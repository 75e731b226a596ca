"""Model parts of Click4Caption, one module each, composed by :mod:`.builder`."""
from click4caption.models.click4caption import Click4Caption

__all__ = ["Click4Caption"]

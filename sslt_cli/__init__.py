"""sslt: self-supervised visual sound-source localisation (SSL-TIE and baselines)."""

__version__ = "0.1.0.dev0"

# The published evaluation protocols (their presets: ``protocols.PROTOCOLS``, data without torch): the one list that the
# recipe schema (``eval.protocol``), ``sslt eval --protocol`` and ``evaluate.get_protocol`` accept.
from sslt_cli.protocols import PROTOCOL_NAMES  # noqa: E402

__all__ = ["PROTOCOL_NAMES", "__version__"]

"""sslt: self-supervised visual sound-source localisation (SSL-TIE and baselines)."""

__version__ = "0.1.0.dev0"

# The published evaluation protocols (``metrics.PROTOCOLS`` holds their presets): the one list that the recipe schema
# (``eval.protocol``), ``sslt eval --protocol`` and ``evaluate.get_protocol`` accept. Here, so ``sslt --help`` needs
# no heavy import to show it.
PROTOCOL_NAMES = ("ssltie", "lvs", "ezvsl", "fnac", "sspl", "slavc")

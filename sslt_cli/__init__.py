"""sslt: self-supervised visual sound-source localisation (SSL-TIE and baselines)."""

__version__ = "0.1.0.dev0"

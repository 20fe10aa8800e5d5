"""Providers: one module per email API, all of the ``Provider`` shape (``base.py``)."""

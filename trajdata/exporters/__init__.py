"""Exporters: trajdata datasets into other tools' formats (``minari``)."""

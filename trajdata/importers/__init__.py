"""Importers: datasets in other formats (NLD via ``nle.dataset``) written as trajdata shards."""

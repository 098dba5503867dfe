"""PMD pipeline: raw public metadata -> filtered candidates -> fetched images -> webdataset shards."""

__version__ = "0.1.0"

"""Data: webdataset shards -> resumable, rank-aware packed batches."""

from tml.data.loader import DataError, LoaderConfig, PackedBatchLoader, ShardEpisodeSource, read_manifest

__all__ = ["DataError", "LoaderConfig", "PackedBatchLoader", "ShardEpisodeSource", "read_manifest"]

"""Command-line tools that turn raw corpora or synthesis into webdataset shards."""

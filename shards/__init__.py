"""The shard format: where shards live, how a sample is laid out, how shards are written and read."""

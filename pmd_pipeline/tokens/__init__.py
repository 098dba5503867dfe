"""Token stage: the DALL-E dVAE encoder, one shard's KEY.dvae.npy tokens, and the Ray actor pool that runs it."""

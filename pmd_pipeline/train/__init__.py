"""FLAVA joint pretraining on built PMD shards: config -> preflight -> data -> model -> loop."""

"""Corpus preparation (raw text -> webdataset shards) and the streaming, masking loader."""

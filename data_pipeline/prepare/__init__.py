"""The offline pipeline, `distil prepare`: raw text -> shuffled webdataset shards + manifest.json +
token_counts.npy + tokenizer/. command (the CLI), corpus (which files, which documents), tokenize (the
tokenizer and the recipe's chunking), stage (worker processes making tar members), shuffle, shards (writing and
publishing), sample_corpus (the quickstart's corpus)."""

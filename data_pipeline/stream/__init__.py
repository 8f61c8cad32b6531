"""The online loader: shards -> per-rank, length-grouped, dynamically masked, resumable batches. loader
(PretrainStream, the public entry), read and tarscan (reading shards), plan (who reads what), produce (batches
in the workers), batching (cutting and padding), position (the saved position, elastic resume)."""

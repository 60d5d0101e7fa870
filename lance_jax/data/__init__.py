"""Data: shard format, readers, sample building, token-budget packing into stream batches, Grain pipeline.

  schema.py        `lance_interleaved_v1` Parquet schema + adapters from the reference's six layouts (50 §6)
  shards.py        shard writer, random-access shard source (index.json), reference-parquet source
  write_shards.py  CLI: `python -m lance_jax.data.write_shards --input folder_or_jsonl --out DIR`
  media.py         image decode (white alpha composite), 4k+1 frame sampling, bucket sizes
  records.py       one sample -> a *sample record* (ids, splits, MaPE ids, latents, timestep logits, CE)
  pack.py          greedy token-budget packing of sample records into a fixed-capacity stream batch
  pipeline.py      the Grain pipeline (mix, shuffle, per-record rng, CFG drops, packing, per-process
                   sharding, checkpointable state, corrupt-record accounting)
"""

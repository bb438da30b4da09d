"""PainterBot pipeline: webdataset shards -> Ray workers -> encoder.fit_batch -> Parquet.

Data flows one way (docs/architecture.md): shards -> reader -> worker -> writer -> dataset,
with the driver handing shards to workers. The pipeline calls the encoder only
through its public API (``encoder.load_config``, ``fit_batch``, ``render``).
"""

"""chunkflow: long-context fine-tuning on megatron-core with ChunkFlow chunk scheduling."""

from chunkflow.parallel.cpu_compat import prepare_megatron_import

# megatron-core >= 0.17 imports triton at `import megatron.core`; on machines without
# triton a stand-in for that one MoE-only module must exist before that import.
prepare_megatron_import()

__version__ = "0.1.0"

"""The corpus store: read images from folders, Parquet or .npy (sources), bring them to the store's
resolution (transform), write a memory-mapped uint8 store (ingest, store), and hand images to the
scorers (inputs: corpus views and query checks; queries: query loading; thumbnails)."""
from .demo_corpus import demo_corpus
from .ingest import ingest
from .inputs import CorpusView
from .store import Store, write_store

__all__ = ["CorpusView", "Store", "demo_corpus", "ingest", "write_store"]

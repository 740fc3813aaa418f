"""Search and the vectors searched: the backends (``retriever``: exact torch matmul or FAISS, and the
``RetrievalHit`` they return), used by the engine and the tools alike, and the standalone document/query
encoder (``encoder``) that builds indexes and that the tests hold the engine's vectors against."""

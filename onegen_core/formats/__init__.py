"""What is on disk and shared by every package: ``onegen.json`` (``spec``), the checkpoint directory
(``checkpoint``, ``gguf_import``), the index directory (``index_store``) and the token roles (``roles``)."""

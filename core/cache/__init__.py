"""Response caches: exact (at the key's ring owner), semantic (store, client, verifier, embedders).
Imports base, http, messaging, runtime, state and llm (the GGUF embedder runs on the llm engine)."""

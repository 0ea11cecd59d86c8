"""Language models: llama.cpp engine, continuous batcher, scheduler, prefix cache, chat template,
demo model. Imports base, http, messaging and runtime."""

